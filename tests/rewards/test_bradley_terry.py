"""The Bradley-Terry reward model: loss, training on the tiny pairs, use as a reward spec."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aligndistil.rewards.bradley_terry import BTRewardModel, bt_loss, train_reward_model


def test_bt_loss_values():
    rc, rr = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    want = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))]
    assert bt_loss(rc, rr).tolist() == pytest.approx(want, rel=1e-6)


def test_pooling_uses_the_last_real_token(tiny_ws):
    from transformers import AutoModel

    rm = BTRewardModel(AutoModel.from_pretrained(tiny_ws["model"]))
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    att = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = rm(ids, att)
        alone = rm(ids[:1, :3], att[:1, :3])
        ids2 = ids.clone()
        ids2[0, 3:] = 42  # padding content must not matter
        assert rm(ids2, att)[0] == pytest.approx(float(padded[0]), abs=1e-5)
    assert float(padded[0]) == pytest.approx(float(alone[0]), abs=1e-5)


@pytest.fixture(scope="module")
def trained_rm(tiny_ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    train_reward_model(tiny_ws["model"], tiny_ws["prefs"], out, steps=30, learning_rate=3e-3, batch_size=8,
                       max_length=64, max_prompt_length=32, progress=False, log=lambda *a: None)
    return out


def test_training_learns_the_tiny_preference(trained_rm):
    metrics = [json.loads(x) for x in (trained_rm / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["loss"] for m in metrics[:5]) / 5
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < first
    info = json.loads((trained_rm / "reward_model.json").read_text())
    assert info["steps"] == 30 and (trained_rm / "reward_head.safetensors").is_file()


def test_bt_spec_as_a_reward(trained_rm):
    from aligndistil.rewards import get_reward
    from aligndistil.model.tiny import NEGATIVE, POSITIVE

    rw = get_reward(f"bt:{trained_rm}")
    prompts = ["Review the film:"] * 4
    good = rw(prompts, [f"It was {w}." for w in POSITIVE[:4]])
    bad = rw(prompts, [f"It was {w}." for w in NEGATIVE[:4]])
    assert all(isinstance(x, float) and math.isfinite(x) for x in good + bad)
    assert sum(good) / 4 > sum(bad) / 4  # it learned which words the data prefers


def test_bad_reward_model_folders(tmp_path, trained_rm):
    from aligndistil.model.loading import ModelLoadError
    from aligndistil.rewards import get_reward

    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadError, match="not a complete reward model"):
        get_reward(f"bt:{tmp_path / 'half'}")
    with pytest.raises(ValueError, match="give the reward model folder"):
        get_reward("bt:")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        train_reward_model(str(trained_rm), "unused.jsonl", tmp_path / "precious", progress=False)
    assert (tmp_path / "precious" / "notes.txt").is_file()


def test_train_rm_cli(tiny_ws, tmp_path):
    from aligndistil.cli import main

    out = tmp_path / "rm"
    assert main(["train-rm", "--model", tiny_ws["model"], "--pairs", tiny_ws["prefs"], "--out", str(out),
                 "--steps", "2", "--batch-size", "4", "--max-length", "64", "--no-progress"]) == 0
    assert (out / "reward_model.json").is_file()
