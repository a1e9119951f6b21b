"""Shared helpers for the benchmarks: device description, peak memory, subprocess cases, output.

Every case runs in its own Python process, so that one case's allocations never count
toward another's peak. Peak memory:

- CPU: the process's peak resident set size. On Linux the peak (``VmHWM``) is reset
  right before the measured region by writing ``5`` to ``/proc/self/clear_refs``, and the
  result is ``VmHWM - VmRSS`` at the reset, i.e. what the measured region added on top of
  what was already resident. Elsewhere ``ru_maxrss`` is used (no reset; less precise).
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated at the reset.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_info() -> dict:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": _dt.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_bytes`` (what the block added at its peak)."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") * 1024
            self.how = "peak RSS (VmHWM after clear_refs) - RSS at start"
            self.linux = True
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.how = "ru_maxrss delta (no reset available)"
            self.linux = False
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_abs = torch.cuda.max_memory_allocated()
        elif self.linux:
            self.peak_abs = _status_kb("VmHWM") * 1024
        else:
            self.peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, self.peak_abs - self.base)
        return False


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def run_case(script: str | Path, case: dict, timeout: int = 3600) -> dict:
    """Run ``script --case JSON`` in a fresh process; return the dict it prints after ``RESULT ``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--case", json.dumps(case)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {**case, "error": (res.stderr or res.stdout)[-3000:]}


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def write(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j = RESULTS / f"{name}.json"
    m = RESULTS / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2) + "\n")
    m.write_text(markdown)
    return j, m


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
