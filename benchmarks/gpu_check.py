"""One-go GPU check: does training stay correct and fast on the hardware users have?

Run on one GPU with no internet (tiny and randomly initialised models only):

    PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu-check

It writes ``<out>.json`` and ``<out>.md`` with one section per check:

1. ``fused_precision``: the fused AlignDistil and TDPO statistics with bf16 hidden states
   and bf16 heads at Qwen2.5-1.5B head dimensions (V=151,936, d=1,536), against a float64
   reference on the same values: relative error of the loss and of every gradient.
2. ``chunk_sweep``: time and peak memory (allocated and reserved) of the fused AlignDistil
   loss side, forward + backward, per chunk size, and of the plain full-logit path.
3. ``bf16_master_weights``: two steps of the tiny DPO with ``model.dtype=bfloat16`` at lr 1e-6:
   the share of policy weights that moved (pure-bf16 AdamW rounds most updates away).
4. ``bf16_step``: a randomly initialised model at Qwen2.5-1.5B width (2 layers) trained with
   off-policy AlignDistil under bf16 for a few steps on one repeated batch: the loss must
   fall; step time and peak memory for the plain and fused loss paths.
5. ``on_policy_resume``: on-policy AlignDistil, 4 steps straight vs 2 steps + ``--resume``:
   weights and logged losses must be identical (CUDA RNG saved and restored).
6. ``sharded_single_gpu``: ``accelerate launch`` with each shipped sharded config
   (``fsdp.yaml``, ``deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``, bf16 as shipped) on one
   process: DPO and off-policy AlignDistil (ZeRO-3: on-policy too), 4 steps, then a resume
   from step 2: exit codes, the loss path in use, the errors. (Two processes of each run in
   the CPU test suite, without bf16: tests/train/test_fsdp.py and test_deepspeed.py.)

Every check runs in its own ``try``: one failure is recorded and the others still run.
``--smoke`` runs it all on a CPU at tiny sizes (checks 1-5 run so in the test suite:
tests/benchmarks/test_gpu_check.py; all six took 195 s on the 2-core CPU, 185 s of them check 6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Qwen2.5-1.5B's head; --smoke shrinks everything so the script can be checked on a CPU.
QWEN_V, QWEN_D, MEDIUM_FF = 151_936, 1_536, 8_960
CUDA = torch.cuda.is_available()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _reset_peak():
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(base: int = 0) -> float:
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if CUDA else float("nan")


def _reserved_gib() -> float:
    return round(torch.cuda.max_memory_reserved() / 2**30, 3) if CUDA else float("nan")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- 1. precision
def fused_precision(dev, rows=1024):
    from aligndistil.losses import tdpo as TD
    from aligndistil.losses import fused as FL
    from aligndistil.losses.aligndistil import aligndistil_loss_from_stats, aligndistil_token_stats, kl_row_weight

    g = torch.Generator(device=dev).manual_seed(0)
    B, T = 4, rows // 4

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(torch.bfloat16)

    W, Wb, Wn = (rnd(QWEN_V, QWEN_D, scale=0.02) for _ in range(3))
    h, hb, hn = (rnd(B, T, QWEN_D) for _ in range(3))
    mask = torch.ones(B, T, device=dev)
    mask[1, T // 2:] = 0
    labels = torch.randint(0, QWEN_V, (B, T), generator=g, device=dev) * mask.long()
    out = {}

    # AlignDistil, adaptive teacher: float64 reference, then the fused path in bf16 with and
    # without fp32-output matmuls (engine.FP32_OUT_MATMUL), on the same values.
    from aligndistil.losses.fused import engine as E

    hd, Wd = h.double().requires_grad_(), W.double().requires_grad_()
    z, zb, zn = hd @ Wd.t(), hb.double() @ Wb.double().t(), hn.double() @ Wn.double().t()
    kl_d, alpha_d, tvd_d = aligndistil_token_stats(z, zb, zn, mask.double(), r=10.0, eps=1e-3)
    loss_d = aligndistil_loss_from_stats(kl_d, mask.double(), alpha=alpha_d, beta0=0.1, tvd=tvd_d)[0].sum()
    loss_d.backward()
    del z, zb, zn, kl_d
    for fp32_out in (True, False):
        E.FP32_OUT_MATMUL = fp32_out
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        kl, alpha, tvd = FL.aligndistil_token_stats(FL.HeadRows(hf, Wf), FL.HeadRows(hb, Wb), FL.HeadRows(hn, Wn),
                                                    mask, r=10.0, eps=1e-3, **kl_row_weight(mask, beta0=0.1))
        loss_f = aligndistil_loss_from_stats(kl, mask, alpha=alpha, beta0=0.1, tvd=tvd)[0].sum()
        loss_f.backward()
        out[f"aligndistil fp32_out_matmul={fp32_out}"] = {
            "fp32_out_supported": E._FP32_OUT_OK.get(dev.type),
            "fp32_out_addmm_trusted": E._FP32_ADDMM_OK.get(dev.type),  # head-weight gradient (None: not probed)
            "loss_bf16_fused": float(loss_f.detach()),
            "loss_fp64": float(loss_d.detach()),
            "loss_rel_err": abs(float(loss_f.detach()) - float(loss_d.detach())) / abs(float(loss_d.detach())),
            "alpha_rel_err": _rel(alpha * mask, alpha_d * mask),
            "grad_hidden_rel_err": _rel(hf.grad, hd.grad), "grad_head_rel_err": _rel(Wf.grad, Wd.grad)}
    E.FP32_OUT_MATMUL = True
    del hd, Wd
    _reset_peak()

    # TDPO statistics (forward KL + label log-probs), chosen only for brevity: same heads.
    hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    lc, lr, rc, rr, klc, klr = FL.token_level_stats(FL.HeadRows(hf, Wf), FL.HeadRows(hb, Wf), FL.HeadRows(hn, Wb),
                                                    FL.HeadRows(hn, Wb), labels, labels, mask, mask)
    (lc.sum() + klc.sum() - lr.sum()).backward()
    hd, hbd, Wd = h.double().requires_grad_(), hb.double().requires_grad_(), W.double().requires_grad_()
    zc, zr, zref = hd @ Wd.t(), hbd @ Wd.t(), hn.double() @ Wb.double().t()
    s = TD.pair_token_stats(zc, zr, zref, zref, labels, labels, mask.double(), mask.double())
    ((s[0] * mask).sum() + (s[4] * mask).sum() - (s[1] * mask).sum()).backward()
    out["tdpo_stats"] = {"grad_hidden_rel_err": _rel(hf.grad, hd.grad), "grad_head_rel_err": _rel(Wf.grad, Wd.grad),
                         "kl_rel_err": _rel(klc * mask, s[4] * mask), "logp_rel_err": _rel(lc * mask, s[0] * mask)}
    return out


# ----------------------------------------------------------------------------- 2. chunk sweep
def chunk_sweep(dev, rows=4096, sizes=(64, 128, 256, 512, 1024, 2048, "auto")):
    from aligndistil.losses import fused as FL
    from aligndistil.losses.aligndistil import aligndistil_loss_from_stats, aligndistil_token_stats, kl_row_weight

    g = torch.Generator(device=dev).manual_seed(1)
    B, T = 8, rows // 8
    W, Wb, Wn = ((torch.randn(QWEN_V, QWEN_D, generator=g, device=dev) * 0.02).to(torch.bfloat16) for _ in range(3))
    h, hb, hn = (torch.randn(B, T, QWEN_D, generator=g, device=dev).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(B, T, device=dev)

    def fused(cs):
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        kl, a, tvd = FL.aligndistil_token_stats(FL.HeadRows(hf, Wf), FL.HeadRows(hb, Wb), FL.HeadRows(hn, Wn), mask,
                                                r=10.0, eps=1e-3, chunk_size=cs, **kl_row_weight(mask, beta0=0.1))
        aligndistil_loss_from_stats(kl, mask, alpha=a, beta0=0.1, tvd=tvd)[0].sum().backward()

    def plain():
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            z, zb, zn = hf @ Wf.t(), hb @ Wb.t(), hn @ Wn.t()
        kl, a, tvd = aligndistil_token_stats(z.float(), zb.float(), zn.float(), mask, r=10.0, eps=1e-3)
        aligndistil_loss_from_stats(kl, mask, alpha=a, beta0=0.1, tvd=tvd)[0].sum().backward()

    res = []
    for name, fn in [*[(f"fused chunk={c}", (lambda c=c: fused(c))) for c in sizes], ("plain (full logits)", plain)]:
        fn()  # warm-up
        _sync()
        _reset_peak()
        base = torch.cuda.memory_allocated() if CUDA else 0
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        _sync()
        res.append({"case": name, "ms": round((time.perf_counter() - t0) / 3 * 1e3, 2),
                    "peak_alloc_gib": _peak_gib(base), "peak_reserved_gib": _reserved_gib()})
    return {"rows": rows, "V": QWEN_V, "d": QWEN_D, "cases": res}


# ----------------------------------------------------------------------------- training helpers
def _cfg(ws, out, method, extra=()):
    from aligndistil.config import RunConfig, apply_overrides

    data = ws["kto"] if method == "kto" else ws["prefs"]
    return apply_overrides(RunConfig(), [
        f"model.policy={ws['model']}", f"model.dpo_model={ws['model2']}", f"model.reverse_dpo_model={ws['model']}",
        f"data.train_file={data}", "data.max_length=64", "data.max_prompt_length=32",
        f"train.output_dir={out}", "train.max_steps=2", "train.per_device_batch_size=4",
        "train.learning_rate=1e-2", "train.warmup_ratio=0", "train.progress_bar=false",
        f"method.name={method}", *extra,
    ])


def _flat(model) -> torch.Tensor:
    from aligndistil.model.outputs import unwrap

    return torch.cat([p.detach().float().reshape(-1).cpu() for p in unwrap(model).parameters()])


def bf16_master_weights(ws, tmp):
    from aligndistil.model.loading import load_causal_lm
    from aligndistil.train.loop import Trainer

    init = _flat(load_causal_lm(ws["model"], dtype=torch.float32))
    tr = Trainer(_cfg(ws, tmp / "bf16", "dpo", ["model.dtype=bfloat16", "train.learning_rate=1e-6"]))
    tr.train()
    moved = float((_flat(tr.policy) != init).float().mean())
    dtypes = sorted({str(p.dtype) for p in tr.policy.parameters()})
    return {"share_of_policy_weights_moved": moved, "policy_param_dtypes": dtypes}


def _medium_model(out: Path, seed: int):
    """A random 2-layer model at Qwen2.5-1.5B width and vocabulary, with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aligndistil.model.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=QWEN_V, hidden_size=QWEN_D, intermediate_size=MEDIUM_FF, num_hidden_layers=2,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if CUDA else "cpu"):
        m = Qwen2ForCausalLM(cfg)
    m.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def bf16_step(ws, tmp, steps=6):
    from aligndistil.train.loop import Trainer

    mws = {"model": _medium_model(tmp / "m0", 0), "model2": _medium_model(tmp / "m1", 1), "prefs": ws["prefs"]}
    res = {}
    for path in ("plain", "fused"):
        out = tmp / f"medium-{path}"
        _reset_peak()
        cfg = _cfg(mws, out, "aligndistil", [
            "method.mode=off_policy", "model.dtype=bfloat16", f"train.loss_path={path}", f"train.max_steps={steps}",
            "data.max_examples=4", "train.learning_rate=1e-4", "data.max_length=128"])
        t0 = time.perf_counter()
        Trainer(cfg).train()
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        done = json.loads((out / "COMPLETE.json").read_text())
        res[path] = {"losses": [round(r["loss"], 5) for r in rows], "wall_s": round(wall, 2),
                     "peak_alloc_gib": _peak_gib(),
                     "loss_path_recorded": done.get("loss_path"), "loss_falls": rows[-1]["loss"] < rows[0]["loss"]}
    return res


def on_policy_resume(ws, tmp):
    from safetensors.torch import load_file

    from aligndistil.train.loop import Trainer

    opts = ["method.mode=on_policy", "method.max_new_tokens=6", "train.max_steps=4", "train.save_steps=2",
            "train.warmup_ratio=0.25"]
    full = Trainer(_cfg(ws, tmp / "full", "aligndistil", opts)).train()
    died = tmp / "died"
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (died / "metrics.jsonl").write_text("".join(x + "\n" for x in lines[:2]))
    resumed = Trainer(_cfg(ws, died, "aligndistil", opts), resume=True).train()
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    max_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    la = [json.loads(x)["loss"] for x in lines]
    lb = [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    return {"max_weight_diff": max_diff, "losses_full": la, "losses_resumed": lb, "exact": max_diff == 0 and la == lb}


SHARDED_RUNS = (  # (accelerate config, method, its tiny config, extra overrides)
    ("fsdp", "dpo", "dpo", []),
    ("fsdp", "aligndistil", "aligndistil_off_policy", ["method.mode=off_policy"]),
    ("deepspeed_zero2", "aligndistil", "aligndistil_off_policy", ["method.mode=off_policy"]),
    ("deepspeed_zero3", "dpo", "dpo", []),
    ("deepspeed_zero3", "aligndistil", "aligndistil_off_policy", ["method.mode=off_policy"]),
    ("deepspeed_zero3", "aligndistil-on", "aligndistil_on_policy", ["method.mode=on_policy", "method.max_new_tokens=8"]),
)


def sharded_single_gpu(ws, tmp):
    """Each shipped sharded accelerate config (with its bf16) on one process: train 4 steps
    with a checkpoint at 2, then resume from it; exit codes, the loss path and the errors."""
    res = {}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for accel, method, tiny, extra in SHARDED_RUNS:
        out = tmp / f"{accel}-{method}"
        overrides = [f"model.policy={ws['model']}", f"model.dpo_model={ws['model2']}",
                     f"model.reverse_dpo_model={ws['model']}", f"data.train_file={ws['prefs']}",
                     f"train.output_dir={out}", "train.max_steps=4", "train.save_steps=2",
                     "train.per_device_batch_size=4", "train.progress_bar=false",
                     f"method.name={method.split('-')[0]}", *extra]
        base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / f"configs/accelerate/{accel}.yaml"), "--num_processes", "1", "-m", "aligndistil", "train",
                "-c", str(REPO / f"configs/tiny/{tiny}.yaml")]
        runs = {}
        for name, cmd in (("train", base + overrides), ("resume", base + ["--resume"] + overrides)):
            if name == "resume":
                (out / "COMPLETE.json").unlink(missing_ok=True)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            text = p.stdout + p.stderr
            errors = [ln for ln in text.splitlines() if "Error" in ln or "error:" in ln][-6:]
            runs[name] = {"rc": p.returncode, "errors": errors, "tail": text[-400:]}
        done = out / "COMPLETE.json"
        runs["loss_path"] = json.loads(done.read_text()).get("loss_path") if done.is_file() else None
        res[f"{accel}/{method}"] = runs
    return res


# ----------------------------------------------------------------------------- report
def _md(results: dict) -> str:
    lines = ["# GPU check", "", f"Device: {results['device']}; torch {results['torch']}; "
             f"transformers {results['transformers']}; {results['date']}", ""]
    for name, r in results["checks"].items():
        lines.append(f"## {name} ({r.get('seconds', '?')} s)")
        lines.append("")
        if "error" in r:
            lines += ["ERROR:", "```", r["error"][-1500:], "```", ""]
            continue
        if name == "chunk_sweep":
            lines += ["| case | ms | peak allocated GiB | peak reserved GiB |", "|---|---|---|---|"]
            lines += [f"| {c['case']} | {c['ms']} | {c['peak_alloc_gib']} | {c['peak_reserved_gib']} |"
                      for c in r["result"]["cases"]]
        else:
            lines += ["```json", json.dumps(r["result"], indent=2)[:3000], "```"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/gpu-check"),
                    help="output path without extension; .json and .md are written")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks (names as in the docstring)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on whatever device there is: checks the script itself, measures nothing")
    args = ap.parse_args(argv)
    global QWEN_V, QWEN_D, MEDIUM_FF
    if args.smoke:
        QWEN_V, QWEN_D, MEDIUM_FF = 512, 96, 128  # 12 heads of 8
    elif not CUDA:
        sys.exit("gpu_check: no CUDA device; this script is for a GPU machine (use --smoke to check it on a CPU)")
    import transformers

    from aligndistil.model.tiny import build_tiny_model, make_tiny_workspace

    dev = torch.device("cuda" if CUDA else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ws = make_tiny_workspace(tmp / "ws")
    ws["model2"] = str(build_tiny_model(tmp / "ws" / "model2", seed=1))
    checks = {
        "fused_precision": lambda: fused_precision(dev, rows=64 if args.smoke else 1024),
        "chunk_sweep": lambda: chunk_sweep(dev, rows=128 if args.smoke else 4096),
        "bf16_master_weights": lambda: bf16_master_weights(ws, tmp),
        "bf16_step": lambda: bf16_step(ws, tmp),
        "on_policy_resume": lambda: on_policy_resume(ws, tmp),
        "sharded_single_gpu": lambda: sharded_single_gpu(ws, tmp),
    }
    results = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu (smoke)", "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), "checks": {}}
    for name, fn in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            r = {"result": fn()}
        except Exception:  # noqa: BLE001 - record and go on to the next check
            r = {"error": traceback.format_exc()}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["checks"][name] = r
        print(f"[gpu_check] {name}: {'ERROR' if 'error' in r else 'ok'} in {r['seconds']} s", flush=True)
        _reset_peak()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(_md(results))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
