"""Every method trains a tiny random model for a few steps: finite loss, moved weights, metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aligndistil.config import RunConfig, apply_overrides
from aligndistil.train.loop import Trainer

EXPECTED_METRICS = {
    "sft": {"nll/sequence", "response_length"},
    "dpo": {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"},
    "ipo": {"rewards/margins"},
    "dpop": {"rewards/margins", "dpop/penalty"},
    "simpo": {"rewards/margins", "logps/chosen"},
    "kto": {"rewards/chosen", "rewards/rejected", "kl"},
    "tdpo1": {"rewards/margins", "kl/chosen", "kl/rejected"},
    "tdpo2": {"rewards/margins", "kl/chosen", "kl/rejected"},
    "sparsepo": {"kl/chosen", "mask/sparsity", "mask/reward_mean"},
    "mapo": {"kl/chosen", "mask/sparsity"},
    "aligndistil": {"teacher_kl", "alpha/mean", "response_length"},
}

CASES = [
    ("sft", []), ("dpo", []), ("dpo", ["method.reverse=true"]), ("ipo", []), ("dpop", []), ("simpo", []),
    ("kto", []), ("tdpo1", []), ("tdpo2", []), ("sparsepo", []), ("sparsepo", ["method.mask_shared=false"]),
    ("mapo", []),
    ("aligndistil", ["method.mode=off_policy", "method.teacher=adaptive"]),
    ("aligndistil", ["method.mode=off_policy", "method.teacher=contrastive"]),
    ("aligndistil", ["method.mode=off_policy", "method.teacher=vanilla", "method.beta=0.05"]),
    ("aligndistil", ["method.mode=off_policy", "method.teacher=constant", "method.alpha=2.0"]),
    ("aligndistil", ["method.mode=off_policy", "method.weighting=uniform"]),
    ("aligndistil", ["method.mode=on_policy", "method.max_new_tokens=6", "method.num_samples=2"]),
]


def make_cfg(ws, out, method, extra=()):
    data = ws["kto"] if method == "kto" else ws["prefs"]
    return apply_overrides(RunConfig(), [
        f"model.policy={ws['model']}", f"model.dpo_model={ws['model2']}", f"model.reverse_dpo_model={ws['model']}",
        f"data.train_file={data}", "data.max_length=64", "data.max_prompt_length=32",
        f"train.output_dir={out}", "train.max_steps=2", "train.per_device_batch_size=4",
        "train.learning_rate=1e-2", "train.warmup_ratio=0", "train.progress_bar=false",
        f"method.name={method}", *extra,
    ])


@pytest.mark.parametrize("method, extra", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(x.split("=")[1] for x in c))
def test_method_trains(tiny_ws, tmp_path, method, extra):
    cfg = make_cfg(tiny_ws, tmp_path / "out", method, extra)
    out = Trainer(cfg).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert EXPECTED_METRICS[method] <= set(rows[-1]), set(rows[-1])
    before = load_file(f"{tiny_ws['model']}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    moved = sum(float((before[k] - after[k]).abs().max()) for k in before)
    assert moved > 0, "no parameter changed"
    assert (out / "COMPLETE.json").is_file() and (out / "config.yaml").is_file()
    if method == "sparsepo":
        assert (out / "mask.safetensors").is_file()


def test_on_policy_samples_are_masked_to_the_sample(tiny_ws):
    """The on-policy batch covers exactly the sampled tokens: after EOS nothing counts."""
    from aligndistil.model.sampling import response_mask_after_eos

    gen = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert response_mask_after_eos(gen, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_the_loss_path_in_use_is_recorded_and_a_fallback_is_named(tiny_ws, tmp_path):
    """A fallback from the fused path is never silent: COMPLETE.json says which path ran and,
    for a fallback, which model's logits are not lm_head(hidden)."""
    import shutil

    def path_of(out):
        return json.loads((out / "COMPLETE.json").read_text())["loss_path"]

    assert path_of(Trainer(make_cfg(tiny_ws, tmp_path / "f", "dpo")).train()) == "fused"
    assert path_of(Trainer(make_cfg(tiny_ws, tmp_path / "p", "dpo", ["train.loss_path=plain"])).train()) == "plain"
    capped = tmp_path / "capped"
    shutil.copytree(tiny_ws["model"], capped)
    conf = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**conf, "final_logit_softcapping": 30.0}))
    ws = {**tiny_ws, "model2": str(capped)}
    out = Trainer(make_cfg(ws, tmp_path / "a", "aligndistil", ["method.mode=off_policy"])).train()
    assert path_of(out) == "plain (fallback: the logits of dpo_model are not lm_head(hidden))"
