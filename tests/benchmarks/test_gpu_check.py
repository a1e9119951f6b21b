"""``benchmarks/gpu_check.py --smoke``: the GPU check's CPU parts, so the script a GPU session
runs in one go is known to work before a GPU is lent (its measurements need the GPU; the
smoke run shrinks every size and checks only that each check runs and says what it should).

The ``sharded_single_gpu`` check (twelve accelerate launches, about 3 minutes on this CPU)
is left to the GPU run; its configs run on two CPU processes in tests/train/test_fsdp.py and
test_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_CHECKS = ["fused_precision", "chunk_sweep", "bf16_master_weights", "bf16_step", "on_policy_resume"]


def test_gpu_check_smoke_runs_every_cpu_check_and_writes_its_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "smoke"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                          "--only", *CPU_CHECKS], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["checks"]) == CPU_CHECKS
    errors = {k: v["error"][-800:] for k, v in report["checks"].items() if "error" in v}
    assert not errors, errors
    checks = {k: v["result"] for k, v in report["checks"].items()}
    # Each check's own verdicts (their sizes are tiny, the verdicts still hold):
    assert checks["on_policy_resume"]["exact"] and checks["on_policy_resume"]["max_weight_diff"] == 0.0
    assert checks["bf16_master_weights"]["share_of_policy_weights_moved"] > 0.5
    assert checks["bf16_master_weights"]["policy_param_dtypes"] == ["torch.float32"]
    for path in ("plain", "fused"):
        assert checks["bf16_step"][path]["loss_falls"] and checks["bf16_step"][path]["loss_path_recorded"] == path
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# GPU check") and all(f"## {name}" in md for name in CPU_CHECKS)
