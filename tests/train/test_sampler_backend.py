"""The on-policy sampler is pluggable: a backend object behind the HF sampler's interface is used
for every rollout, told after each optimizer step that its weights are stale, and its
``sampler_logps`` feed the truncated importance weight of PPO's policy loss. A stand-in backend
(the HF loop plus fixed log-probs) plays vLLM here, so this runs without a GPU."""

from __future__ import annotations

import json

import torch

from aligndistil.config import RunConfig, apply_overrides
from aligndistil.model import vllm_sampler as VS
from aligndistil.model.sampling import sample_responses
from aligndistil.train import frozen as FR
from aligndistil.train.loop import Trainer


class StandIn:
    """Samples with the HF loop; claims every sampled token had log-probability -50 in "its" engine."""

    def __init__(self):
        self.calls, self.stale_marks = 0, 0

    def mark_stale(self):
        self.stale_marks += 1

    def sample_responses(self, model, ids, att, **kw):
        self.calls += 1
        b = sample_responses(model, ids, att, **kw)
        b["sampler_logps"] = torch.full(b["input_ids"].shape, -50.0)
        return b


def test_a_sampler_backend_serves_the_rollouts_and_weights_ppo_by_the_capped_ratio(tiny_ws, tmp_path, monkeypatch):
    backend = StandIn()
    monkeypatch.setattr(VS, "check_backend", lambda cfg, uses_sampling: None)  # no vllm, no GPU here
    monkeypatch.setattr(FR, "make_sampler", lambda cfg, method, log=print: backend)
    out = tmp_path / "ppo"
    cfg = apply_overrides(RunConfig(), [
        f"model.policy={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}", "data.max_length=64",
        "data.max_prompt_length=32", f"train.output_dir={out}", "train.max_steps=2", "train.per_device_batch_size=2",
        "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.progress_bar=false", "method.name=ppo",
        "method.reward=vader", "method.max_new_tokens=4", "method.ppo_epochs=2", "method.generation_backend=vllm",
        "method.vllm_importance_sampling_correction=true", "method.vllm_importance_sampling_cap=1.5"])
    Trainer(cfg).train()
    # One rollout per step; two optimizer updates per step (ppo_epochs=2), each marks the engine stale.
    assert backend.calls == 2 and backend.stale_marks == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # pi_old(y_t) / pi_engine(y_t) = exp(log pi_old + 50) is far above the cap: every token weighs 1.5.
    assert [round(r["rollout/is_weight"], 6) for r in rows] == [1.5, 1.5]
