"""FSDP2 on two CPU processes (gloo), with the shipped ``configs/accelerate/fsdp.yaml``.

accelerate enables FSDP only on GPUs; ``_sharded_cpu.py`` lifts that one restriction, so what
runs here is the trainer's own FSDP code: the policy, its optimizer state and the frozen
teachers sharded over two processes, the full weights gathered on both for saving, and the
name-keyed optimizer state loaded after ``prepare`` on resume.
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

HERE = Path(__file__).resolve().parent


def _cpu_config(tmp_path) -> Path:
    """The shipped fsdp.yaml for two CPU processes: no mixed precision (bf16 autocast is slow
    on a CPU and would blur the comparison) and no GPU-side weight initialisation."""
    cfg = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    cfg.update(num_processes=2, mixed_precision="no")
    cfg["fsdp_config"]["fsdp_sync_module_states"] = False
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _resumed_equals_full(launch: list, args: list, tmp_path) -> Path:
    """Run ``args`` for 3 steps with a checkpoint after each; then resume a copy of
    checkpoint-1 and check that it ends as the uninterrupted run did. Returns the full run."""
    full, died = tmp_path / "full", tmp_path / "died"
    res = _run([*launch, *args, f"train.output_dir={full}"])
    log = res.stdout + res.stderr
    assert "[fsdp] model.dpo_model: sharded over 2 processes" in log, log[-2000:]
    assert "[fsdp] model.reverse_dpo_model: sharded over 2 processes" in log
    died.mkdir()
    shutil.copytree(full / "checkpoint-1", died / "checkpoint-1")
    (died / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _run([*launch, "--resume", *args, f"train.output_dir={died}"])
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)
    assert_same_weights(full, died, atol=1e-6)
    return full


def _launch(tmp_path) -> list:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_cpu_config(tmp_path)),
            str(HERE / "_sharded_cpu.py"), "train", "-c", str(cfg_file)]


def test_fsdp2_on_two_processes_equals_one_saves_and_resumes_exactly(tiny_ws, tmp_path):
    """Off-policy AlignDistil (fused loss, two frozen teachers), AdamW, 3 steps: two FSDP2
    processes with batch 2 each equal one process with batch 4 (losses and saved weights);
    a run resumed from checkpoint-1 equals the uninterrupted one (AdamW moments restored)."""
    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.learning_rate=1e-2", "train.optimizer=adamw",
            "method.name=aligndistil", "method.mode=off_policy"]
    one = tmp_path / "one"
    launch = _launch(tmp_path)
    _run([sys.executable, "-m", "aligndistil", "train", "-c", launch[-1], *args,
          "train.per_device_batch_size=4", f"train.output_dir={one}"])
    full = _resumed_equals_full(launch, [*args, "train.per_device_batch_size=2", "train.save_steps=1",
                                         "train.save_total_limit=5"], tmp_path)
    assert json.loads((full / "COMPLETE.json").read_text())["loss_path"] == "fused"
    assert losses(full) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(one, full, atol=1e-5)
    state = torch.load(full / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert state["optimizer_format"] == "full_by_name"
    moments = state["optimizer"]["state"]
    assert "policy.lm_head.weight" in moments  # the whole (75, 32) head, not one process's half
    assert tuple(moments["policy.lm_head.weight"]["exp_avg"].shape) == (75, 32)


def test_fsdp2_on_policy_generates_from_sharded_weights_and_resumes_exactly(tiny_ws, tmp_path):
    """On-policy AlignDistil under FSDP2: each process samples from the sharded policy (the
    layers gather their weights as the sampling loop calls them), and a resume from
    checkpoint-1 (weights, optimizer, every process's RNG) equals the uninterrupted run.
    (Two processes sample with their own seeds, so no one-process run equals this one.)"""
    args = [*launch_args(tiny_ws), "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5",
            "train.per_device_batch_size=2", "train.learning_rate=1e-2", "method.name=aligndistil",
            "method.mode=on_policy", "method.max_new_tokens=6"]
    full = _resumed_equals_full(_launch(tmp_path), args, tmp_path)
    assert len(losses(full)) == 3


def test_a_second_trainable_module_is_refused_under_fsdp(tiny_ws, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    res = _run_failing([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(_cpu_config(tmp_path)), str(HERE / "_sharded_cpu.py"), "train", "-c", str(cfg_file),
                        f"model.policy={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}",
                        "method.name=sparsepo", f"train.output_dir={tmp_path / 'o'}"])
    assert "trains a second module beside the policy" in res.stderr and "use DDP" in res.stderr
    assert not (tmp_path / "o").exists()


def _run_failing(cmd):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode != 0, res.stdout[-2000:]
    return res
