"""The LM-head matmuls of one chunk alone: time per row vs chunk rows, and the layout.

The fused path computes each chunk's logits as ``(rows x d) @ (d x V)`` into a ``rows x V``
buffer, and its backward ``G @ W`` (hidden-state gradient) and ``G^T @ h`` (weight
gradient). This times those GEMMs at several chunk sizes, and the transposed layout
``(V x d) @ (d x rows)`` into a ``V x rows`` buffer, which the kernels do not use today.
BENCHMARKS.md cites it for why small chunks are slow at a large head.

    python benchmarks/probe_head_matmul.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SIZES = {"smollm2": (576, 49152), "qwen2.5-1.5b": (1536, 151936)}


def _ms_per_row(fn, rows: int, reps: int) -> float:
    fn()  # warm-up
    C.sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    C.sync()
    return (time.perf_counter() - t) / reps * 1e3 / rows


def measure(size: str, rows: int, reps: int) -> dict:
    import torch

    dev = C.device()
    d, V = SIZES[size]
    torch.manual_seed(0)
    W = torch.randn(V, d, device=dev) * 0.02
    h = torch.randn(rows, d, device=dev)
    G = torch.randn(rows, V, device=dev)
    logits, logits_t = torch.empty(rows, V, device=dev), torch.empty(V, rows, device=dev)
    grad_h, grad_w = torch.empty(rows, d, device=dev), torch.zeros(V, d, device=dev)
    times = {
        "logits rows x V": _ms_per_row(lambda: torch.mm(h, W.t(), out=logits), rows, reps),
        "logits V x rows": _ms_per_row(lambda: torch.mm(W, h.t(), out=logits_t), rows, reps),
        "grad_h G @ W": _ms_per_row(lambda: torch.mm(G, W, out=grad_h), rows, reps),
        "grad_W += G^T h": _ms_per_row(lambda: grad_w.addmm_(G.t(), h), rows, reps),
    }
    flops_per_row = 2 * d * V
    return {"size": size, "rows": rows, "d": d, "V": V, "reps": reps, "ms_per_row": times,
            "gflops": {k: flops_per_row / (v * 1e-3) / 1e9 for k, v in times.items()}}


def markdown(results: list[dict], info: dict, command: str) -> str:
    keys = list(results[0]["ms_per_row"]) if results else []
    rows = [[r["size"], r["rows"], *(f"{r['ms_per_row'][k]:.2f} ({r['gflops'][k]:.0f})" for k in keys)]
            for r in results]
    return "\n".join([
        "# LM-head GEMMs of one chunk: ms per row (GFLOPS)\n",
        f"Device: {info.get('gpu') or info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
        f"torch {info['torch']}, {info['date']}. Command: `{command}`\n",
        C.table(["head", "chunk rows", *keys], rows),
    ]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), help="head sizes")
    ap.add_argument("--rows", nargs="*", type=int, default=[48, 64, 128, 224, 256], help="chunk rows")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per GEMM")
    ap.add_argument("--name", default="head-matmul", help="output name under benchmarks/results/")
    a = ap.parse_args(argv)
    info = C.device_info()
    results = []
    for size in a.sizes:
        for rows in a.rows:
            r = measure(size, rows, a.reps)
            results.append(r)
            print(json.dumps({"size": size, "rows": rows, **{k: round(v, 3) for k, v in r["ms_per_row"].items()}}),
                  flush=True)
    C.report(a.name, __file__, info, results, markdown)


if __name__ == "__main__":
    main()
