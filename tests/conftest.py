"""Shared fixtures: a tiny random model and synthetic data, built once per session, offline."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ws(tmp_path_factory):
    """``{"model", "prefs", "kto", "model2"}``: a random 2-layer Llama, 32 pairs, 32 unpaired
    examples, and a second model with other weights (same vocabulary) to play a teacher."""
    from aligndistil.model.tiny import build_tiny_model, make_tiny_workspace

    root = tmp_path_factory.mktemp("tiny")
    ws = make_tiny_workspace(root)
    ws["model2"] = str(build_tiny_model(root / "model2", seed=1))
    ws["root"] = str(root)
    return ws
