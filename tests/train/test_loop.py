"""The training loop: exact resume, exact normalisation, clean failures, multi-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligndistil.config import apply_overrides
from aligndistil.train.loop import Trainer, TrainingError
from test_methods import make_cfg

REPO = Path(__file__).resolve().parents[2]


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def losses(folder) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra", [
    ("aligndistil", ["method.mode=on_policy", "method.max_new_tokens=6"]),  # RNG state matters: sampling
    ("sparsepo", []),  # extra trainable module and its own optimizer group
])
def test_resume_is_exact(tiny_ws, tmp_path, method, extra):
    opts = [*extra, "train.max_steps=4", "train.save_steps=2", "train.warmup_ratio=0.25"]
    full = Trainer(make_cfg(tiny_ws, tmp_path / "full", method, opts)).train()
    assert (full / "checkpoint-2" / "trainer_state.pt").is_file()
    # A run that died after step 2: only its checkpoint and the first two metric lines survive.
    died = tmp_path / "died"
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    (died / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:3]))
    resumed = Trainer(make_cfg(tiny_ws, died, method, opts), resume=True).train()
    assert_same_weights(full, resumed)
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    assert len(losses(resumed)) == 4  # the stale line for step 3 was dropped


def test_resume_refuses_a_different_config(tiny_ws, tmp_path):
    opts = ["train.max_steps=2", "train.save_steps=1"]
    Trainer(make_cfg(tiny_ws, tmp_path / "a", "dpo", opts)).train()
    with pytest.raises(ValueError, match="different config"):
        Trainer(make_cfg(tiny_ws, tmp_path / "a", "dpo", [*opts, "method.beta=0.3"]), resume=True).train()


@pytest.mark.parametrize("method", ["sft", "tdpo2", "aligndistil"])
def test_gradient_accumulation_equals_the_whole_batch(tiny_ws, tmp_path, method):
    """bs 4 x 1 and bs 2 x 2 (and 1 x 4) take the same steps: losses normalised over the step."""
    outs = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        cfg = make_cfg(tiny_ws, tmp_path / f"{bs}x{ga}", method,
                       [f"train.per_device_batch_size={bs}", f"train.gradient_accumulation_steps={ga}", "train.max_steps=2",
                        # SGD: the update is linear in the gradient, so equal gradients give equal
                        # weights; Adam would amplify float noise on near-zero gradients.
                        "train.optimizer=sgd", "train.learning_rate=0.5"])
        outs.append(Trainer(cfg).train())
    for o in outs[1:]:
        assert losses(o) == pytest.approx(losses(outs[0]), abs=1e-5)
        assert_same_weights(outs[0], o, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_ws, tmp_path):
    cfg = make_cfg(tiny_ws, tmp_path / "nan", "dpo", ["train.max_steps=4", "train.save_steps=1"])
    trainer = Trainer(cfg)
    real = trainer.method.loss
    calls = {"n": 0}

    def poisoned(ctx, batch):
        calls["n"] += 1
        losses, metrics = real(ctx, batch)
        return (losses * float("nan") if calls["n"] == 3 else losses), metrics

    trainer.method = replace(trainer.method, loss=poisoned)
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss.*checkpoint-2"):
        trainer.train()
    out = tmp_path / "nan"
    assert (out / "checkpoint-2" / "model" / "model.safetensors").is_file()
    assert not (out / "COMPLETE.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_teacher_with_another_vocabulary_is_refused(tiny_ws, tmp_path):
    from aligndistil.model.tiny import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    build_tokenizer().save_pretrained(tmp_path / "other")
    cfg = make_cfg(tiny_ws, tmp_path / "o", "aligndistil", [f"model.dpo_model={tmp_path / 'other'}"])
    with pytest.raises(ValueError, match="model.dpo_model .* vocabulary of 50"):
        Trainer(cfg).train()


def test_teacher_with_the_same_size_but_another_token_map_is_refused(tiny_ws, tmp_path):
    """Same head size, but two tokens swap ids in the teacher's tokenizer: the sizes alone
    would pass, the token-to-id maps do not."""
    import json
    import shutil

    other = tmp_path / "swapped"
    shutil.copytree(tiny_ws["model"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = make_cfg(tiny_ws, tmp_path / "o", "aligndistil", [f"model.dpo_model={other}"])
    with pytest.raises(ValueError, match="(?s)model.dpo_model.*differ"):
        Trainer(cfg).train()


def test_too_little_data_for_one_batch(tiny_ws, tmp_path):
    cfg = make_cfg(tiny_ws, tmp_path / "x", "dpo", ["train.per_device_batch_size=40"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(cfg).train()


def launch_args(tiny_ws) -> list[str]:
    """What every multi-process test's tiny run shares: the models, the data and the lengths
    (the method, the budget and the batch split are each test's own)."""
    return [f"model.policy={tiny_ws['model']}", f"model.dpo_model={tiny_ws['model2']}",
            f"model.reverse_dpo_model={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}",
            "data.max_length=64", "data.max_prompt_length=32", "train.warmup_ratio=0", "train.progress_bar=false"]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("method, extra", [
    ("tdpo2", []),
    ("sft", []),  # token-normalised: ranks hold different token counts
    ("aligndistil", ["method.mode=off_policy"]),
])
def test_two_processes_equal_one(tiny_ws, tmp_path, method, extra):
    """accelerate launch --num_processes 2 (batch 2 each) == one process with batch 4."""
    cfg_args = [*launch_args(tiny_ws), "train.max_steps=2", "train.learning_rate=0.5", "train.optimizer=sgd",
                f"method.name={method}", *extra]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    one = tmp_path / "one"
    two = tmp_path / "two"
    _run([sys.executable, "-m", "aligndistil", "train", "-c", str(cfg_file), *cfg_args,
          "train.per_device_batch_size=4", f"train.output_dir={one}"])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"), "-m", "aligndistil", "train", "-c", str(cfg_file),
          *cfg_args, "train.per_device_batch_size=2", f"train.output_dir={two}"])
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(one, two, atol=1e-5)


def test_max_examples_is_applied_before_the_data_report(tiny_ws, tmp_path, capsys):
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["data.max_examples=16", "train.max_steps=0"])).train()
    done = json.loads((out / "COMPLETE.json").read_text())
    assert done["data"]["n_used"] == 16 and done["steps"] == 4  # 16 pairs in batches of 4, one epoch
    assert "training on the first 16 (data.max_examples)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- precision
def test_bf16_runs_train_float32_master_weights(tiny_ws, tmp_path, capsys):
    """model.dtype=bfloat16 at lr 1e-6: a bf16 policy would round most AdamW updates away
    (1e-6 is far below half the bf16 spacing near a weight of ~0.02); the float32 master
    copy keeps them. The frozen reference stays bfloat16; the policy's forward autocasts."""
    from aligndistil.model.outputs import unwrap

    cfg = make_cfg(tiny_ws, tmp_path / "bf16", "dpo", ["model.dtype=bfloat16", "train.learning_rate=1e-6"])
    trainer = Trainer(cfg)
    out = trainer.train()
    assert "bfloat16 on a CPU" in capsys.readouterr().out  # the CPU warning
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.frozen["reference"].dtype == torch.bfloat16
    after = {k: v.detach() for k, v in unwrap(trainer.policy).state_dict().items()}
    before = weights(tiny_ws["model"])
    changed = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    # Only embedding rows of tokens absent from both steps' batches keep their value.
    assert changed / total > 0.9, f"{changed / total:.1%} of the policy's weights changed"
    assert all(v.dtype == torch.float32 for v in after.values())
    assert all(v.dtype == torch.float32 for v in weights(out).values())  # saved as trained: float32


@pytest.mark.parametrize("dtype, on_cpu, launched, mp, says", [
    ("float32", True, None, "no", None),
    ("float32", False, "no", "no", None),
    ("bfloat16", False, None, "bf16", None),
    ("bfloat16", True, None, "bf16", "slow"),
    ("float16", False, "no", "fp16", None),
    ("float16", True, None, "no", "needs a GPU"),
    ("float32", False, "bf16", "bf16", "wins over model.dtype"),
])
def test_the_mixed_precision_follows_model_dtype_unless_chosen_at_launch(dtype, on_cpu, launched, mp, says):
    from aligndistil.train.accel import choose_mixed_precision

    got, note = choose_mixed_precision(dtype, on_cpu=on_cpu, launched=launched)
    assert got == mp
    assert (note is None) if says is None else (says in note)


# ----------------------------------------------------------------------------- DeepSpeed (config only)
def test_deepspeed_config_is_resolved_from_the_run_config():
    """The resolution only: deepspeed is not installed here, so the engine path is unrun."""
    from aligndistil.config import ConfigError
    from aligndistil.train.accel import resolve_deepspeed_config

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    got = resolve_deepspeed_config(ds, per_device_batch_size=4, gradient_accumulation_steps=2, world_size=3,
                                   max_grad_norm=0.5)
    # 4 per device x 2 accumulated x 3 processes = 24 sequences per optimizer step.
    assert got == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 24,
                   "gradient_clipping": 0.5, "zero_optimization": {"stage": 3}}
    assert ds["train_batch_size"] == "auto"  # the input is not changed
    same = resolve_deepspeed_config({**got}, per_device_batch_size=4, gradient_accumulation_steps=2, world_size=3,
                                    max_grad_norm=0.5)
    assert same == got
    off = resolve_deepspeed_config({}, per_device_batch_size=1, gradient_accumulation_steps=1, world_size=1,
                                   max_grad_norm=0)
    assert off["gradient_clipping"] == 0.0  # train.max_grad_norm=0: no clipping, as without DeepSpeed
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 .* needs 4 \(train.per_device_batch_size\)"):
        resolve_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, per_device_batch_size=4,
                                 gradient_accumulation_steps=2, world_size=3, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r"gradient_clipping=1.0 .* needs 0.0 \(train.max_grad_norm\)"):
        resolve_deepspeed_config({"gradient_clipping": 1.0}, per_device_batch_size=4,
                                 gradient_accumulation_steps=2, world_size=3, max_grad_norm=0)


def test_a_second_trainable_module_is_refused_under_deepspeed(tiny_ws, tmp_path, monkeypatch):
    from aligndistil.config import ConfigError
    from aligndistil.train import accel

    monkeypatch.setattr(accel, "uses_deepspeed", lambda acc: True)
    with pytest.raises(ConfigError, match="sparsepo trains a second module beside the policy"):
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "sparsepo"))


# ----------------------------------------------------------------------------- seeds per process
def test_each_process_draws_its_own_sampling_noise():
    from aligndistil.train.accel import seed_sampling

    seed_sampling(7, 0)
    a = torch.rand(4)
    seed_sampling(7, 1)
    b = torch.rand(4)
    seed_sampling(7, 0)
    assert torch.equal(torch.rand(4), a) and not torch.equal(a, b)


def test_two_process_on_policy_resume_is_exact_and_saves_every_process_rng(tiny_ws, tmp_path):
    """Two gloo processes, on-policy AlignDistil: each rank samples with its own seed, both
    ranks' RNG states go into the checkpoint, and a resume from it equals the full run."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.save_steps=1",
            "train.save_total_limit=5", "train.per_device_batch_size=2", "train.learning_rate=1e-2",
            "method.name=aligndistil", "method.mode=on_policy",
            "method.max_new_tokens=6"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"), "-m", "aligndistil", "train", "-c", str(cfg_file)]
    full, died = tmp_path / "full", tmp_path / "died"
    _run([*launch, *args, f"train.output_dir={full}"])
    state = torch.load(full / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    ranks = state["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    died.mkdir()
    shutil.copytree(full / "checkpoint-1", died / "checkpoint-1")
    (died / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _run([*launch, "--resume", *args, f"train.output_dir={died}"])
    assert_same_weights(full, died)
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)
