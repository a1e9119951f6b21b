"""Every shipped accelerate config (``configs/accelerate/*.yaml``) is run by a test.

Which test runs which file: ``multi_cpu.yaml`` by test_loop.py (two processes equal one),
``fsdp.yaml`` by test_fsdp.py, ``deepspeed_zero2.yaml`` and ``deepspeed_zero3.yaml`` by
test_deepspeed.py (all on two CPU processes; ``benchmarks/gpu_check.py`` runs the sharded
ones on a GPU with their bf16), and ``ddp.yaml`` here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_loop import REPO, _run, launch_args

HERE = Path(__file__).resolve().parent


#: shipped config -> the test that launches it (file, function)
LAUNCHED_BY = {
    "multi_cpu.yaml": ("test_loop.py", "test_two_processes_equal_one"),
    "ddp.yaml": ("test_accelerate_configs.py", "test_ddp_yaml_with_its_bf16_on_two_cpu_processes"),
    "fsdp.yaml": ("test_fsdp.py", "test_fsdp2_on_two_processes_equals_one_saves_and_resumes_exactly"),
    "deepspeed_zero2.yaml": ("test_deepspeed.py", "test_zero_with_accumulation_and_clipping_equals_one_process"),
    "deepspeed_zero3.yaml": ("test_deepspeed.py", "test_zero3_on_policy_samples_from_the_partitioned_policy_and_resumes_exactly"),
}


def test_every_shipped_accelerate_config_is_launched_by_a_test():
    """A config added to configs/accelerate/ without a test launching it fails here."""
    shipped = sorted(p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml"))
    assert shipped == sorted(LAUNCHED_BY)
    for name, (file, test) in LAUNCHED_BY.items():
        source = (HERE / file).read_text()
        assert f"def {test}(" in source, (name, file, test)
        stem = name[: -len(".yaml")].rstrip("23")  # test_deepspeed.py builds deepspeed_zero{stage}.yaml
        assert stem in source, (name, file)


def test_ddp_yaml_with_its_bf16_on_two_cpu_processes(tiny_ws, tmp_path):
    """``ddp.yaml`` as shipped (bf16 mixed precision), with two processes instead of eight:
    data parallelism over gloo, the policy's forward under bf16 autocast on fp32 master
    weights, and the fused loss path kept (not silently dropped for full logits)."""
    (tmp_path / "run.yaml").write_text("{}\n")
    out = tmp_path / "o"
    res = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                "-m", "aligndistil", "train", "-c", str(tmp_path / "run.yaml"), *launch_args(tiny_ws),
                "train.max_steps=1", "train.per_device_batch_size=2", "method.name=aligndistil",
                "method.mode=off_policy", f"train.output_dir={out}"])
    done = json.loads((out / "COMPLETE.json").read_text())
    assert done["loss_path"] == "fused" and done["steps"] == 1
    assert "[loss path] fused" in res.stdout + res.stderr
