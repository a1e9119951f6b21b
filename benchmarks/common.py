"""Shared helpers for the benchmarks: device description, peak memory, subprocess cases, output.

Every case runs in its own Python process, so that one case's allocations never count
toward another's peak. Peak memory:

- CPU: the process's peak resident set size. On Linux the peak (``VmHWM``) is reset
  right before the measured region by writing ``5`` to ``/proc/self/clear_refs``, and the
  result is ``VmHWM - VmRSS`` at the reset, i.e. what the measured region added on top of
  what was already resident. Elsewhere ``ru_maxrss`` is used (no reset; less precise).
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated at the reset; and beside it the allocator's reserved memory
  (``max_memory_reserved`` minus the reserved at the reset: what the process holds from the
  GPU, fragmentation included), as ``peak_reserved_bytes`` (None on a CPU).
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
            self.base_reserved = torch.cuda.memory_reserved()
            self.how = "cuda max_memory_allocated (and max_memory_reserved)"
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
        self.peak_reserved_bytes = None
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_abs = torch.cuda.max_memory_allocated()
            self.peak_reserved_bytes = max(0, torch.cuda.max_memory_reserved() - self.base_reserved)
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


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / hz


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_until_idle(max_wait: float = 900.0, threshold: float = 0.3, window: float = 3.0) -> float:
    """Wait until other processes use under ``threshold`` cores (shared machines); returns seconds waited."""
    start = time.time()
    while time.time() - start < max_wait:
        b0 = _busy_seconds()
        if b0 is None:
            return 0.0
        time.sleep(window)
        if (_busy_seconds() - b0) / window < threshold:
            break
    return time.time() - start


def run_case(script: str | Path, case: dict, timeout: int = 3600, retries: int = 2) -> dict:
    """Run ``script --case JSON`` in a fresh process; return the dict it prints after ``RESULT ``.

    On a shared machine other processes' CPU use during the case is measured (machine busy
    time minus the case's own CPU time, in cores); a case that ran alongside more than 0.3
    cores of other work is repeated (up to ``retries`` times) after waiting for the machine
    to be idle, and the result records ``other_load`` either way.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--case", json.dumps(case)]
    for attempt in range(retries + 1):
        waited = wait_until_idle()
        b0, c0, t0 = _busy_seconds(), _children_cpu(), time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.time() - t0
        other = None if b0 is None else max(0.0, (_busy_seconds() - b0) - (_children_cpu() - c0)) / wall
        out = None
        for line in res.stdout.splitlines()[::-1]:
            if line.startswith("RESULT "):
                out = json.loads(line[len("RESULT "):])
                break
        if out is None:
            out = {**case, "error": (res.stderr or res.stdout)[-3000:]}
        out.update(other_load=other, waited_for_idle_s=round(waited, 1), attempt=attempt)
        if other is None or other < 0.3 or "error" in out:
            return out
        print(f"  (other processes used {other:.2f} cores during this case; repeating it)", flush=True)
    return out


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def write(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``.md`` (each via a temp file and a rename)."""
    from aligndistil.fileio import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    j = atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    m = atomic_write_text(RESULTS / f"{name}.md", markdown)
    return j, m


def report(name: str, script: str | Path, info: dict, results: list[dict], markdown) -> None:
    """Record a benchmark run: the command that reproduces it, the JSON and the Markdown
    (``markdown(results, info, command)``) under ``results/<name>``; print the Markdown."""
    command = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:])
    j, m = write(name, {"device": info, "command": command, "results": results}, markdown(results, info, command))
    print(f"wrote {j} and {m}")
    print(m.read_text())


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
