"""aligndistil.rewards.sentiment: the built-in VADER reward, offline (its lexicon ships in its wheel)."""

from __future__ import annotations

import sys

import pytest

from aligndistil.rewards import get_reward


# --- vader -----------------------------------------------------------------------------


def test_vader_orders_sentiment():
    vader = get_reward("vader")
    pos, neu, neg = vader(
        ["p"] * 3,
        [
            "This was a wonderful, delightful evening and I loved every minute of it!",
            "The bus leaves at nine.",
            "Awful service, cold food, and a rude waiter. I hated it.",
        ],
    )
    assert pos > 0.5
    assert neu == 0.0
    assert neg < -0.5
    assert all(isinstance(x, float) for x in (pos, neu, neg))


def test_vader_ignores_prompt_and_handles_empty():
    vader = get_reward("vader")
    assert vader(["I love this", "I hate this"], ["", ""]) == [0.0, 0.0]
    assert vader([], []) == []


def test_vader_missing_package_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        get_reward("vader")
