"""Chunk size vs speed and memory of the fused AlignDistil loss (the loss side alone).

Runs ``bench_loss.py``'s fused ``aligndistil`` case at several ``chunk_size`` values per head
size, each in its own process, and writes ``benchmarks/results/<name>.{json,md}``. It is
what chose the ``chunk_size: auto`` budget (``losses/fused/engine.py``): every chunk re-reads each
head's ``V x d`` weights, so small chunks are slow at a large head, and large chunks hold
more ``rows x V`` buffers.

    python benchmarks/sweep_chunk.py
    python benchmarks/sweep_chunk.py --sizes qwen2.5-1.5b --chunks 32 64 auto
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CHUNKS = {"smollm2": ["64", "128", "256", "auto"], "qwen2.5-1.5b": ["32", "64", "128", "256", "auto"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=list(DEFAULT_CHUNKS), help="head sizes (bench_loss.py's names)")
    ap.add_argument("--chunks", nargs="*", default=None, help="chunk sizes (integers or auto); default per size")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per case (median reported)")
    ap.add_argument("--name", default="chunk-sweep", help="output name under benchmarks/results/")
    a = ap.parse_args(argv)
    from aligndistil.losses import fused as FL

    info = C.device_info()
    results = []
    for size in a.sizes:
        for ch in a.chunks or DEFAULT_CHUNKS[size]:
            chunk = ch if ch == "auto" else int(ch)
            case = {"size": size, "method": "aligndistil", "path": "fused", "batch": 4, "rows": 256,
                    "chunk_size": chunk, "reps": a.reps}
            r = C.run_case(HERE / "bench_loss.py", case)
            if chunk == "auto" and "V" in r:
                r["auto_rows"] = FL.auto_chunk_rows(FL.ReverseKL.n_buffers, r["V"])
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("size", "chunk_size", "median_s", "peak_bytes", "error")}), flush=True)
    C.report(a.name, __file__, info, results, markdown)


def markdown(results: list[dict], info: dict, command: str) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["size"], r["chunk_size"], "error", "", "", r["error"][-100:].replace("\n", " ")])
            continue
        ch = f"auto ({r['auto_rows']} rows)" if r["chunk_size"] == "auto" else r["chunk_size"]
        busy = r.get("other_load") or 0
        rows.append([r["size"], ch, f"{r['median_s']:.2f}", " ".join(f"{s:.2f}" for s in r["seconds"]),
                     C.gb(r["peak_bytes"]), f"CONTENDED {busy:.2f} cores" if busy >= 0.3 else ""])
    return "\n".join([
        "# Fused AlignDistil loss: chunk size sweep (B=4 x 256 response rows, forward + backward)\n",
        f"Device: {info.get('gpu') or info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
        f"torch {info['torch']}, {info['date']}. Command: `{command}`\n",
        C.table(["head", "chunk rows", "median s", "reps s", "peak GB", "note"], rows),
    ]) + "\n"


if __name__ == "__main__":
    main()
