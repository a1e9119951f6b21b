"""The loss side alone: LM head + token-level loss, forward and backward, plain vs fused.

Random weights at two head sizes: SmolLM2-135M (d=576, V=49,152) and Qwen2.5-1.5B
(d=1536, V=151,936). Inputs are the policy's final hidden states at the response
positions (and the frozen models' hidden states and head weights), exactly what
``modeling.response_outputs`` hands the losses; the measured region is what the loss path
adds: the head matmuls, the loss, and the backward to the hidden states and the head
weight (whose gradient, V x d, both paths produce). Each case runs in its own process.

    python benchmarks/bench_loss.py                 # all cases, writes benchmarks/results/loss.{json,md}
    python benchmarks/bench_loss.py --sizes smollm2 --methods aligndistil
    python benchmarks/bench_loss.py --dtype bfloat16   # bf16 hidden states and heads (a GPU's mode)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SIZES = {"smollm2": (576, 49152), "qwen2.5-1.5b": (1536, 151936)}
METHODS = ("aligndistil", "tdpo2", "dpo")


def run_one(case: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from aligndistil import losses as L
    from aligndistil.losses.ops import label_logps
    from aligndistil.losses import fused as FL

    torch.manual_seed(0)
    dev = C.device()
    dt = getattr(torch, case.get("dtype", "float32"))  # hidden states and head weights
    d, V = SIZES[case["size"]]
    B, T = case["batch"], case["rows"]
    pairs = case["method"] != "aligndistil"
    std = 0.02  # the usual init scale; logits of a few units

    def hidden(n=B):
        return torch.randn(n, T, d, device=dev).to(dt)

    W = (torch.randn(V, d, device=dev) * std).to(dt).requires_grad_()
    Wf = [(torch.randn(V, d, device=dev) * std).to(dt) for _ in range(2)]
    mask = torch.ones(B, T, device=dev)
    labels = torch.randint(0, V, (B, T), device=dev)
    hs = [hidden().requires_grad_() for _ in range(2 if pairs else 1)]
    hf = [hidden() for _ in range(2)]
    chunk = case["chunk_size"]

    def loss():
        if case["method"] == "aligndistil":  # the adaptive teacher, as methods.aligndistil_step runs it
            if case["path"] == "plain":
                with torch.no_grad():
                    zb, zn = F.linear(hf[0], Wf[0]), F.linear(hf[1], Wf[1])
                kl, a, tvd = L.aligndistil_token_stats(F.linear(hs[0], W), zb, zn, mask, r=10.0, eps=1e-3)
            else:
                kl, a, tvd = FL.aligndistil_token_stats(
                    FL.HeadRows(hs[0], W), FL.HeadRows(hf[0], Wf[0]), FL.HeadRows(hf[1], Wf[1]), mask, r=10.0,
                    eps=1e-3, chunk_size=chunk, **L.kl_row_weight(mask, beta0=0.1))
            losses, _ = L.aligndistil_loss_from_stats(kl, mask, alpha=a, tvd=tvd, beta0=0.1)
        elif case["method"] == "tdpo2":
            if case["path"] == "plain":
                with torch.no_grad():
                    rc, rr = F.linear(hf[0], Wf[0]), F.linear(hf[1], Wf[0])
                losses, _ = L.tdpo_loss(F.linear(hs[0], W), F.linear(hs[1], W), rc, rr, labels, labels, mask, mask,
                                        variant=2, beta=0.1, alpha=0.5)
            else:
                stats = FL.token_level_stats(FL.HeadRows(hs[0], W), FL.HeadRows(hs[1], W), FL.HeadRows(hf[0], Wf[0]),
                                             FL.HeadRows(hf[1], Wf[0]), labels, labels, mask, mask, chunk_size=chunk)
                losses, _ = L.tdpo_loss_from_stats(*stats, mask, mask, variant=2, beta=0.1, alpha=0.5)
        else:  # dpo: label log-probs only
            if case["path"] == "plain":
                pc, pr = (label_logps(F.linear(h, W), labels) for h in hs)
                with torch.no_grad():
                    rc, rr = (label_logps(F.linear(h, Wf[0]), labels) for h in hf)
            else:
                # chosen and rejected in one pass, as methods.py does: one head-weight gradient
                pc, pr = FL.label_logps_group([FL.HeadRows(h, W) for h in hs], [labels, labels], [mask, mask],
                                              chunk_size=chunk)
                with torch.no_grad():
                    rc, rr = FL.label_logps_group([FL.HeadRows(h, Wf[0]) for h in hf], [labels, labels], [mask, mask],
                                                  chunk_size=chunk)
            losses, _ = L.dpo_loss(pc, pr, rc, rr, mask, mask, beta=0.1)
        (losses.sum() / B).backward()

    times, peaks, reserved = [], [], []
    for _ in range(case["reps"]):
        for t in hs + [W]:
            t.grad = None
        with C.PeakMemory() as m:
            seconds, _ = C.timed(loss)
        times.append(seconds)
        peaks.append(m.peak_bytes)
        reserved.append(m.peak_reserved_bytes)
    return {**case, "rows_total": B * T * (2 if pairs else 1), "d": d, "V": V,
            "seconds": times, "median_s": statistics.median(times), "peak_bytes": max(peaks),
            "peak_first_bytes": peaks[0], "weight_grad_bytes": V * d * W.element_size(), "memory_how": m.how,
            "peak_reserved_bytes": None if reserved[0] is None else max(reserved)}


def markdown(results: list[dict], info: dict, command: str) -> str:
    out = ["# Loss side: LM head + loss, forward + backward\n",
           f"Device: {info.get('gpu') or info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
           f"torch {info['torch']}, {info['date']}. Command: `{command}`\n",
           f"Hidden states and head weights in {results[0].get('dtype', 'float32') if results else 'float32'}. "
           "Peak = memory the loss region added (it includes the V x d head-weight gradient both paths produce)"
           + ("; reserved = what the GPU allocator held at its peak.\n" if any(r.get("peak_reserved_bytes") is not None
                                                                                for r in results) else ".\n")]
    rows = []
    by = {(r["size"], r["method"], r["path"]): r for r in results if "error" not in r}
    for size in SIZES:
        for method in METHODS:
            p, f = by.get((size, method, "plain")), by.get((size, method, "fused"))
            if not (p and f):
                continue
            busy = max(p.get("other_load") or 0, f.get("other_load") or 0)
            rows.append([size + (f" (CONTENDED {busy:.2f} cores)" if busy >= 0.3 else ""), method, p["rows_total"],
                         f"{p['median_s']:.2f}", f"{f['median_s']:.2f}",
                         f"{p['median_s'] / f['median_s']:.2f}x", C.gb(p["peak_bytes"]), C.gb(f["peak_bytes"]),
                         f"{f['peak_bytes'] / p['peak_bytes']:.3f}", C.gb(p["weight_grad_bytes"])]
                        + ([C.gb(p["peak_reserved_bytes"]), C.gb(f["peak_reserved_bytes"])]
                           if p.get("peak_reserved_bytes") is not None else []))
    reserved = bool(rows) and len(rows[0]) > 10
    out.append(C.table(["head", "method", "rows", "plain s", "fused s", "speed-up", "plain peak GB", "fused peak GB",
                        "fused/plain memory", "of which W grad GB"]
                       + (["plain reserved GB", "fused reserved GB"] if reserved else []), rows))
    errs = [r for r in results if "error" in r]
    if errs:
        out.append("\nFailed cases:\n" + "\n".join(f"- {r['size']} {r['method']} {r['path']}: {r['error'][-300:]}" for r in errs))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--batch", type=int, default=4, help="sequences (pairs for tdpo2/dpo)")
    ap.add_argument("--rows", type=int, default=256, help="response tokens per sequence")
    ap.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: TrainConfig's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="hidden states and head weights (bfloat16: as under DeepSpeed bf16 or bf16 teachers)")
    ap.add_argument("--name", default="loss")
    a = ap.parse_args(argv)
    if a.case:
        C.emit(run_one(json.loads(a.case)))
        return
    from aligndistil.config import TrainConfig
    chunk = a.chunk_size or TrainConfig().chunk_size
    info = C.device_info()
    results = []
    for size in a.sizes:
        for method in a.methods:
            for path in ("plain", "fused"):
                case = {"size": size, "method": method, "path": path, "batch": a.batch, "rows": a.rows,
                        "chunk_size": chunk, "reps": a.reps, "dtype": a.dtype}
                r = C.run_case(__file__, case)
                results.append(r)
                print(json.dumps({k: r.get(k) for k in ("size", "method", "path", "median_s", "peak_bytes", "error")}), flush=True)
    C.report(a.name, __file__, info, results, markdown)


if __name__ == "__main__":
    main()
