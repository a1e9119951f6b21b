"""The vLLM sampler backend: its set-up errors (no package, no GPU, wrong method), the truncated
importance weight against hand-computed values, and a real engine run where vllm and a GPU are
present (skipped cleanly otherwise). The module itself must import without vllm."""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil.config import ConfigError, RunConfig, apply_overrides
from aligndistil.model import vllm_sampler as VS


def method(*overrides):
    return apply_overrides(RunConfig(), list(overrides)).validate().method


VLLM_ON_POLICY = ("method.name=aligndistil", "method.mode=on_policy", "method.generation_backend=vllm")


def test_the_module_imports_without_vllm():
    import sys

    assert "vllm" not in sys.modules or VS._installed("vllm")


def test_truncated_is_weight_by_hand():
    # token 0: log ratio ln 0.5 -> 0.5; token 1: ln 3 -> 3, capped at 2; token 2: 0 -> 1; token 3: padding -> 0.
    trainer = torch.tensor([[math.log(0.25), math.log(0.9), -1.0, 5.0]])
    sampler = torch.tensor([[math.log(0.5), math.log(0.3), -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = VS.truncated_is_weight(trainer, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0, 1.0, 0.0]]))
    # A higher cap lets 3 through.
    torch.testing.assert_close(VS.truncated_is_weight(trainer, sampler, mask, cap=10.0),
                               torch.tensor([[0.5, 3.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="cap"):
        VS.truncated_is_weight(trainer, sampler, mask, cap=0.5)
    with pytest.raises(ValueError, match="one shape"):
        VS.truncated_is_weight(trainer, sampler[:, :3], mask, cap=2.0)


def test_vllm_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(VS, "_installed", lambda name: False)
    with pytest.raises(VS.VLLMError, match=r"aligndistil\[vllm\]"):
        VS.check_backend(method(*VLLM_ON_POLICY), uses_sampling=True)


def test_vllm_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(VS, "_installed", lambda name: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VS.VLLMError, match="CUDA GPU"):
        VS.check_backend(method(*VLLM_ON_POLICY), uses_sampling=True)


def test_vllm_settings_that_cannot_apply_are_refused():
    with pytest.raises(VS.VLLMError, match="samples nothing"):
        VS.check_backend(method("method.name=dpo", "method.generation_backend=vllm"), uses_sampling=False)
    with pytest.raises(VS.VLLMError, match="per-token policy-gradient"):
        VS.check_backend(method(*VLLM_ON_POLICY, "method.vllm_importance_sampling_correction=true"), uses_sampling=True)
    with pytest.raises(VS.VLLMError, match="vllm_server_url"):
        VS.check_backend(method("method.name=ppo", "method.generation_backend=vllm", "method.vllm_mode=server"),
                         uses_sampling=True)
    with pytest.raises(VS.VLLMError, match="only with"):
        VS.check_backend(method("method.name=ppo", "method.vllm_importance_sampling_correction=true"),
                         uses_sampling=True)
    VS.check_backend(method("method.name=ppo"), uses_sampling=True)  # hf: nothing to check
    with pytest.raises(ConfigError, match="generation_backend must be"):
        method("method.generation_backend=sglang")


def test_a_vllm_run_fails_before_anything_loads_or_is_written(tiny_ws, tmp_path):
    """Through the trainer and the CLI: exit 2, the extra named, no output folder."""
    if VS._installed("vllm") and torch.cuda.is_available():
        pytest.skip("vllm and a GPU are present: the run would start")
    from aligndistil.cli import main
    from aligndistil.train.loop import Trainer

    out = tmp_path / "never"
    over = [f"model.policy={tiny_ws['model']}", f"model.dpo_model={tiny_ws['model2']}",
            f"model.reverse_dpo_model={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}",
            f"train.output_dir={out}", *VLLM_ON_POLICY]
    with pytest.raises(VS.VLLMError, match="vllm"):
        Trainer(apply_overrides(RunConfig(), over))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    assert main(["train", "-c", str(cfg), *over]) == 2
    assert not out.exists()


def test_the_hf_backend_keeps_the_fingerprint_of_runs_made_before_it_existed():
    base = RunConfig()
    assert base.fingerprint() == apply_overrides(RunConfig(), ["method.vllm_mode=server"]).fingerprint()
    assert base.fingerprint() != apply_overrides(RunConfig(), ["method.generation_backend=vllm"]).fingerprint()


@pytest.mark.skipif(not (VS._installed("vllm") and torch.cuda.is_available()), reason="needs the vllm package and a GPU")
def test_a_colocated_engine_samples_like_the_hf_loop(tiny_ws):
    """On a GPU with vllm: the engine's batch has the HF sampler's layout, its log-probs are the
    trainer's to within bf16/kernel noise, and a weight sync changes what it samples."""
    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.model.outputs import response_outputs
    from aligndistil.losses.ops import label_logps

    m = method(*VLLM_ON_POLICY, "method.vllm_gpu_memory_utilization=0.2")
    model = load_causal_lm(tiny_ws["model"]).cuda()
    tok = load_tokenizer(tiny_ws["model"])
    sampler = VS.VLLMSampler(m, tiny_ws["model"], dtype="float32", seed=0, log=lambda *_: None)
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]], device="cuda")
    att = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device="cuda")
    b = sampler.sample_responses(model, ids, att, max_new_tokens=6, num_samples=2, pad_token_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and b["response_mask"].sum(-1).min() >= 1
    out = response_outputs(model, b["input_ids"], b["attention_mask"], b["response_mask"])
    trainer_lp = label_logps(out.logits, out.labels) * out.mask
    torch.testing.assert_close(trainer_lp, b["sampler_logps"][:, :trainer_lp.shape[1]] * out.mask, atol=1e-2, rtol=0)
    assert sampler.stale is False
