"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo), with the shipped
``configs/accelerate/deepspeed_zero2.yaml`` and ``deepspeed_zero3.yaml``.

DeepSpeed runs on CPU processes through its own CPU accelerator; accelerate enables it only
on GPUs, and ``_sharded_cpu.py`` lifts that one restriction. What runs here is DeepSpeed's
engine and ZeRO optimizer with the trainer's DeepSpeed code: the ``auto`` values filled from
the run config, the accumulation boundary the loop marks itself (one engine step per
optimizer step), clipping by ``train.max_grad_norm``, and the per-process optimizer
partitions saved and loaded on resume; under ZeRO-3 also the frozen models' own engines,
the fused loss reading the partitioned head, sampling from the partitioned policy, and a
teacher cache built by processes holding whole teachers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_loop import REPO, _run, assert_same_weights, launch_args, losses

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent


def _launch(tmp_path, stage: int = 2, bf16: bool = False) -> list:
    """accelerate launch of the shipped ZeRO-``stage`` config on two CPU processes, without
    its bf16 mixed precision unless asked (bf16 rounding would blur the comparison with one
    fp32 process)."""
    cfg = yaml.safe_load((REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == stage
    assert cfg["mixed_precision"] == "bf16"
    cfg.update(num_processes=2, mixed_precision="bf16" if bf16 else "no")
    (tmp_path / "ds_cpu.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "run.yaml").write_text("{}\n")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "ds_cpu.yaml"),
            str(HERE / "_sharded_cpu.py"), "train", "-c", str(tmp_path / "run.yaml")]


def _grad_norms(folder) -> list[float]:
    return [json.loads(x)["grad_norm"] for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_accumulation_and_clipping_equals_one_process(tiny_ws, tmp_path, stage):
    """Off-policy AlignDistil (fused loss, two frozen teachers), SGD, 2 steps, clipping at 0.005:
    two ZeRO processes x batch 1 x accumulation 2 equal one process with batch 4.

    Under ZeRO-3 every weight is partitioned: the teachers run in engines of their own and
    the fused loss reads the policy's head, which holds 0 elements outside its forward,
    through a gathered copy that passes the head's gradient back to DeepSpeed.

    Each step's gradient norm (about 0.012) is above 0.005, so a run that ignored ``train.max_grad_norm``
    would take a larger step; and an engine stepping on every micro-batch (DeepSpeed's own
    boundary count, were the loop not marking it) would take two steps per optimizer step.
    Either would change the saved weights by far more than the tolerance."""
    args = [*launch_args(tiny_ws), "train.max_steps=2", "train.optimizer=sgd", "train.learning_rate=0.5",
            "train.max_grad_norm=0.005", "method.name=aligndistil", "method.mode=off_policy"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch = _launch(tmp_path, stage)
    _run([sys.executable, "-m", "aligndistil", "train", "-c", launch[-1], *args,
          "train.per_device_batch_size=4", f"train.output_dir={one}"])
    res = _run([*launch, *args, "train.per_device_batch_size=1", "train.gradient_accumulation_steps=2",
                f"train.output_dir={two}"])
    log = res.stdout + res.stderr
    assert "deepspeed" in log.lower()
    assert ("[deepspeed] model.dpo_model: ZeRO-3 partitioned over 2 processes" in log) == (stage == 3)
    assert json.loads((two / "COMPLETE.json").read_text())["loss_path"] == "fused"
    assert all(g > 0.005 for g in _grad_norms(one)), _grad_norms(one)  # clipping is in play
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert _grad_norms(two) == pytest.approx(_grad_norms(one), rel=1e-4)
    assert_same_weights(one, two, atol=1e-5)


def test_zero2_resumes_exactly_from_each_process_optimizer_partition(tiny_ws, tmp_path):
    """DPO with AdamW, 3 steps, a checkpoint after each: the checkpoint holds DeepSpeed's
    optimizer partition of each process (two of them), and a run resumed from checkpoint-1
    ends with the same losses and weights as the uninterrupted one (AdamW moments and fp32
    master weights restored, not restarted)."""
    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5",
            "train.optimizer=adamw", "train.learning_rate=1e-2", "train.per_device_batch_size=2",
            "method.name=dpo"]
    launch = _launch(tmp_path)
    full, died = tmp_path / "full", tmp_path / "died"
    _run([*launch, *args, f"train.output_dir={full}"])
    from aligndistil.train import sharded as SH

    with torch.serialization.safe_globals(list(SH.deepspeed_state_classes())):
        state = torch.load(full / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert state["optimizer_format"] == SH.PER_RANK and len(state["optimizer"]) == 2
    # Each partition holds half of the policy's flat fp32 weights (11,696 of the tiny model's 23,392).
    halves = [p["single_partition_of_fp32_groups"][0].numel() for p in state["optimizer"]]
    assert sum(halves) == sum(v.numel() for v in _weights(full).values()) and halves[0] == halves[1]
    died.mkdir()
    shutil.copytree(full / "checkpoint-1", died / "checkpoint-1")
    (died / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    res = _run([*launch, "--resume", *args, f"train.output_dir={died}"])
    assert "[resume] from" in res.stdout + res.stderr
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)
    assert_same_weights(full, died, atol=1e-6)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_zero3_on_policy_samples_from_the_partitioned_policy_and_resumes_exactly(tiny_ws, tmp_path):
    """On-policy AlignDistil under ZeRO-3, AdamW, 3 steps: each process samples from the
    partitioned policy (its layers gathered as the sampling loop calls them), and a run
    resumed from checkpoint-1 (ZeRO-3 optimizer partitions, every process's RNG) ends as the
    uninterrupted one did."""
    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5",
            "train.optimizer=adamw", "train.learning_rate=1e-2", "train.per_device_batch_size=2",
            "method.name=aligndistil", "method.mode=on_policy", "method.max_new_tokens=6"]
    launch = _launch(tmp_path, 3)
    full, died = tmp_path / "full", tmp_path / "died"
    _run([*launch, *args, f"train.output_dir={full}"])
    died.mkdir()
    shutil.copytree(full / "checkpoint-1", died / "checkpoint-1")
    (died / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _run([*launch, "--resume", *args, f"train.output_dir={died}"])
    assert len(losses(full)) == 3
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)
    assert_same_weights(full, died, atol=1e-6)


def test_zero3_teacher_cache_equals_one_built_by_one_process(tiny_ws, tmp_path):
    """Under ZeRO-3 (zero3_init_flag) transformers partitions every model as it loads; the
    cache's teachers are loaded whole instead, since each process runs them over its own
    share of the examples alone. The cache the two processes write equals one process's,
    byte for byte (the manifest aside, which records the processes)."""
    args = [*launch_args(tiny_ws), "train.max_steps=1", "train.per_device_batch_size=2",
            "method.name=aligndistil", "method.mode=off_policy"]
    launch = _launch(tmp_path, 3)
    one, two = tmp_path / "cache1", tmp_path / "cache2"
    _run([sys.executable, "-m", "aligndistil", "train", "-c", launch[-1], *args, f"train.teacher_cache={one}",
          f"train.output_dir={tmp_path / 'o1'}"])
    _run([*launch, *args, f"train.teacher_cache={two}", f"train.output_dir={tmp_path / 'o2'}"])
    files = sorted(p.name for p in one.iterdir() if p.name != "manifest.json")
    assert files == sorted(p.name for p in two.iterdir() if p.name != "manifest.json") and len(files) >= 3
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_zero3_bf16_saves_the_fp32_master_weights_and_resumes_exactly(tiny_ws, tmp_path):
    """The shipped ZeRO-3 config with its bf16: DeepSpeed runs the policy in bf16 and keeps
    fp32 master weights in its optimizer. Off-policy AlignDistil at lr 1e-6, 3 steps: the
    saved weights are the fp32 masters, and they moved in almost every element (99.9% here),
    where a bf16 copy of them differs from the bf16 initial weights in under 10% (2.8%
    measured: updates of ~1e-6 are below half a bf16 spacing). A resume from checkpoint-1
    (masters loaded from the optimizer partitions) ends exactly as the full run."""
    from safetensors.torch import load_file

    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5",
            "train.per_device_batch_size=2", "train.learning_rate=1e-6", "method.name=aligndistil",
            "method.mode=off_policy"]
    launch = _launch(tmp_path, 3, bf16=True)
    full, died = tmp_path / "full", tmp_path / "died"
    res = _run([*launch, *args, f"train.output_dir={full}"])
    assert "[loss path] fused" in res.stdout + res.stderr
    init, final = load_file(str(Path(tiny_ws["model"]) / "model.safetensors")), _weights(full)
    assert {v.dtype for v in final.values()} == {torch.float32}
    total = sum(v.numel() for v in init.values())
    moved = sum(int((final[k] != init[k]).sum()) for k in init) / total
    moved_in_bf16 = sum(int((final[k].bfloat16() != init[k].bfloat16()).sum()) for k in init) / total
    assert moved > 0.9 and moved_in_bf16 < 0.1, (moved, moved_in_bf16)
    died.mkdir()
    shutil.copytree(full / "checkpoint-1", died / "checkpoint-1")
    (died / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _run([*launch, "--resume", *args, f"train.output_dir={died}"])
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)
    assert_same_weights(full, died, atol=0)
