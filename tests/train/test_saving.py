"""train.save_strategy (steps | epoch | no) and train.push_to_hub (the real huggingface_hub
calls, replaced here by recorders: tests never reach a hub)."""

from __future__ import annotations

import json

import pytest

from aligndistil.config import ConfigError
from aligndistil.train import hub as HUB
from aligndistil.train.checkpoints import numbered_checkpoints, should_save
from aligndistil.train.loop import Trainer
from test_methods import make_cfg


def test_should_save_by_strategy():
    # 7 steps, 3 per epoch: the last step (7) writes the final model, never a checkpoint.
    assert [s for s in range(1, 8) if should_save("steps", 2, s, 3, 7)] == [2, 4, 6]
    assert [s for s in range(1, 8) if should_save("steps", 0, s, 3, 7)] == []
    assert [s for s in range(1, 8) if should_save("epoch", 2, s, 3, 7)] == [3, 6]
    assert [s for s in range(1, 8) if should_save("no", 1, s, 3, 7)] == []


@pytest.mark.parametrize("strategy, want", [("epoch", [2, 4]), ("no", []), ("steps", [1, 2, 3, 4, 5])])
def test_save_strategy_in_a_run(tiny_ws, tmp_path, strategy, want):
    """8 examples in batches of 4: 2 steps per epoch, 3 epochs = 6 steps; save_steps=1 counts
    only for the steps strategy; the final model is always written."""
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", [
        f"train.save_strategy={strategy}", "train.save_steps=1", "train.save_total_limit=10",
        "data.max_examples=8", "train.max_steps=0", "train.num_epochs=3"])).train()
    assert [step for step, _ in numbered_checkpoints(out)] == want
    assert (out / "COMPLETE.json").is_file() and (out / "model.safetensors").is_file()


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / upload_folder (and what the folder held at upload time)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, ignore_patterns=None, **kw):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))  # what the hub would get
        calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "sent": sent, **kw}))
        return "https://huggingface.co/me/tiny-dpo/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_finished_folder_without_checkpoints(tiny_ws, tmp_path, hub_calls):
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", [
        "train.push_to_hub=true", "train.hub_model_id=me/tiny-dpo", "train.hub_private_repo=true",
        "train.save_steps=1", "train.max_steps=3"])).train()
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][1:] == ("me/tiny-dpo", {"private": True, "exist_ok": True})
    _, repo, kw = hub_calls[1]
    assert repo == "me/tiny-dpo" and kw["folder_path"] == str(out)
    sent = kw["sent"]
    assert {"COMPLETE.json", "model.safetensors", "config.json", "config.yaml", "metrics.jsonl"} <= set(sent)
    assert (out / "checkpoint-2").is_dir() and not any(f.startswith(("checkpoint-", ".")) for f in sent), sent
    assert json.loads((out / "COMPLETE.json").read_text())["steps"] == 3


def test_push_to_hub_refuses_up_front(tiny_ws, tmp_path, monkeypatch, hub_calls):
    with pytest.raises(ConfigError, match="train.push_to_hub needs train.hub_model_id") as e:
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.push_to_hub=true"]).validate())
    assert e.value.exit_code == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.push_to_hub=true", "train.hub_model_id=me/x"]))
    assert not (tmp_path / "o").exists() and hub_calls == []


def test_a_failed_upload_says_the_model_is_on_disk(tiny_ws, tmp_path, monkeypatch, hub_calls):
    from huggingface_hub import HfApi

    def refuse(self, **kw):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(HUB.PushError, match=r"training finished and the model is in .*o, but uploading it to "
                                            r"me/x failed: RuntimeError: 401 Unauthorized"):
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.push_to_hub=true", "train.hub_model_id=me/x"])).train()
    assert (tmp_path / "o" / "COMPLETE.json").is_file()
