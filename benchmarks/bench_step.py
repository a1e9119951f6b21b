"""Full optimizer steps on SmolLM2-135M, side by side: our paths and TRL's trainers.

Batches are "response-heavy": B=4 sequences (pairs for the pairwise methods) of a 32-token
prompt (BOS + 31 words) and a 256-token response (255 words + EOS), built from words that
are single tokens, so every variant sees exactly the same token counts. One step = forward,
loss, backward, gradient clipping (1.0), AdamW update, scheduler, zero_grad, in fp32.

Variants (each in its own process; 1 warm-up step, then ``--steps`` timed steps):

- ``aligndistil`` off-policy (adaptive teacher, two teachers): ``plain``, ``fused``,
  ``fused+cache`` (teacher cache built before the timed steps; its build time is reported
  apart), and TRL's one-teacher reverse-KL distillation step (``trl.experimental.gkd.GKDTrainer``
  with ``beta=1``, ``lmbda=0``, i.e. off-policy reverse KL on the same batch);
- ``tdpo2``: ``plain`` vs ``fused``;
- ``dpo``: ours (``fused``, and ``plain`` for reference) vs TRL's ``DPOTrainer``.

Peak memory is the process's peak RSS during the timed steps (CPU; on GPU
``max_memory_allocated``), absolute.

    python benchmarks/bench_step.py                    # everything -> benchmarks/results/step.{json,md}
    python benchmarks/bench_step.py --cases aligndistil --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CASES = {
    "aligndistil": ["plain", "fused", "fused+cache", "trl-gkd"],
    "tdpo2": ["plain", "fused"],
    "dpo": ["plain", "fused", "trl-dpo"],
}
PROMPT_WORDS, RESPONSE_WORDS = 31, 255


# ----------------------------------------------------------------------------- data
def single_token_words(tok, n=3000, seed=0) -> list[str]:
    """Words ``" w"`` that encode to exactly one token (so lengths are exact)."""
    rng = random.Random(seed)
    vocab = [t for t in tok.get_vocab() if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower() and len(t) > 3]
    rng.shuffle(vocab)
    words = []
    for t in vocab:
        w = tok.convert_tokens_to_string([t])
        if len(tok(w, add_special_tokens=False)["input_ids"]) == 1:
            words.append(w)
        if len(words) >= n:
            break
    return words


def write_data(path: Path, tok, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = single_token_words(tok)

    def text(k):
        return "".join(rng.choice(words) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "Say" + text(PROMPT_WORDS - 1), "chosen": text(RESPONSE_WORDS),
                                "rejected": text(RESPONSE_WORDS)}) + "\n")
    return path


# ----------------------------------------------------------------------------- our trainer
def ours(case: dict, tmp: Path) -> dict:
    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.train.loop import Trainer
    from aligndistil.model.loading import load_tokenizer

    data = write_data(tmp / "data.jsonl", load_tokenizer("smollm2"), n=4 * (case["steps"] + 2))
    variant = case["variant"]
    opts = [
        "model.policy=smollm2", "model.dpo_model=smollm2", "model.reverse_dpo_model=smollm2",
        f"data.train_file={data}", "data.max_length=1024", "data.max_prompt_length=64",
        f"train.output_dir={tmp / 'out'}", f"train.max_steps={case['steps'] + 1}", "train.per_device_batch_size=4",
        "train.learning_rate=1e-6", "train.warmup_ratio=0", "train.progress_bar=false",
        f"train.loss_path={'plain' if variant == 'plain' else 'fused'}", f"method.name={case['method']}",
    ]
    if case.get("chunk_size"):
        opts.append(f"train.chunk_size={case['chunk_size']}")
    if case.get("compile"):
        opts.append("train.compile_loss=true")
    if variant == "fused+cache":
        opts.append(f"train.teacher_cache={tmp / 'cache'}")
    if case["method"] == "aligndistil":
        opts += ["method.mode=off_policy", "method.teacher=adaptive"]
    cfg = apply_overrides(RunConfig(), opts)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    trainer.policy.train()
    batch = trainer._micro_batches(0)[0]
    tokens, resp = _count(batch)
    times = []
    trainer.train_step(0)  # warm-up (allocates AdamW state)
    with C.PeakMemory() as mem:
        for step in range(1, case["steps"] + 1):
            dt, _ = C.timed(lambda: trainer.train_step(step))
            times.append(dt)
    out = {"setup_s": setup_s, "tokens": tokens, "response_tokens": resp}
    if variant == "fused+cache":
        man = json.loads((tmp / "cache" / "manifest.json").read_text())
        out["cache_build_s"] = man["built_seconds"]
    return _result(case, times, mem, out)


def _count(batch: dict) -> tuple[int, int]:
    if "chosen_input_ids" in batch:
        t = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        r = int(batch["chosen_response_mask"].sum() + batch["rejected_response_mask"].sum())
    else:
        t, r = int(batch["attention_mask"].sum()), int(batch["response_mask"].sum())
    return t, r


def _result(case, times, mem, extra) -> dict:
    med = statistics.median(times)
    return {**case, **extra, "seconds": times, "median_s": med, "tokens_per_s": extra["tokens"] / med,
            "response_tokens_per_s": extra["response_tokens"] / med, "peak_bytes": mem.peak_abs,
            "peak_above_start_bytes": mem.peak_bytes, "memory_how": mem.how}


# ----------------------------------------------------------------------------- TRL
class _Timer:
    """A TrainerCallback that times each optimizer step after the first."""

    def __new__(cls, steps):
        from transformers import TrainerCallback

        class T(TrainerCallback):
            def __init__(self):
                self.times, self.mem, self.n = [], None, 0

            def on_step_begin(self, args, state, control, **kw):
                C.sync()
                if self.n == 1:
                    self.mem = C.PeakMemory().__enter__()
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                C.sync()
                if self.n >= 1:
                    self.times.append(time.perf_counter() - self.t)
                self.n += 1
                if self.n == steps + 1:
                    self.mem.__exit__(None, None, None)
        return T()


def _trl_common(case, tmp):
    import torch
    return dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=4, max_steps=case["steps"] + 1,
                learning_rate=1e-6, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
                bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                logging_steps=10_000, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
                disable_tqdm=True)


def trl_dpo(case: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from aligndistil.model.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("smollm2")
    data = write_data(tmp / "data.jsonl", tok, n=4 * (case["steps"] + 2))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    policy, ref = load_causal_lm("smollm2").train(), load_causal_lm("smollm2")
    args = DPOConfig(**_trl_common(case, tmp), beta=0.1, max_length=None, precompute_ref_log_probs=False,
                     shuffle_dataset=False) if "shuffle_dataset" in DPOConfig.__dataclass_fields__ else \
        DPOConfig(**_trl_common(case, tmp), beta=0.1, max_length=None, precompute_ref_log_probs=False)
    timer = _Timer(case["steps"])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[timer])
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    resp = int(batch["completion_mask"].sum())
    trainer.train()
    return _result(case, timer.times, timer.mem, {"tokens": tokens, "response_tokens": resp})


def trl_gkd(case: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from aligndistil.data import PreferenceCollator, build_dataset
    from aligndistil.model.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("smollm2")
    data = write_data(tmp / "data.jsonl", tok, n=4 * (case["steps"] + 2))
    feats, _ = build_dataset(data, tok, "sft", max_length=1024, max_prompt_length=64)
    collate = PreferenceCollator(tok.pad_token_id, "sft")

    def collator(rows):
        b = collate([{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in rows])
        labels = b["input_ids"].masked_fill(b["response_mask"] == 0, -100)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels,
                "prompts": b["prompt_input_ids"], "prompt_attention_mask": b["prompt_attention_mask"]}

    student, teacher = load_causal_lm("smollm2").train(), load_causal_lm("smollm2")
    args = GKDConfig(**_trl_common(case, tmp), lmbda=0.0, beta=1.0, seq_kd=False, temperature=1.0, max_length=1024)
    timer = _Timer(case["steps"])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(feats),
                         processing_class=tok, data_collator=collator, callbacks=[timer])
    b = collator(feats[:4])
    tokens, resp = int(b["attention_mask"].sum()), int((b["labels"] != -100).sum())
    trainer.train()
    return _result(case, timer.times, timer.mem, {"tokens": tokens, "response_tokens": resp})


def run_one(case: dict) -> dict:
    import torch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if case["variant"] == "trl-dpo":
            return trl_dpo(case, tmp)
        if case["variant"] == "trl-gkd":
            return trl_gkd(case, tmp)
        return ours(case, tmp)


# ----------------------------------------------------------------------------- report
def markdown(results: list[dict], info: dict, command: str) -> str:
    out = ["# Full optimizer steps, SmolLM2-135M, B=4, prompt 32 + response 256 tokens, fp32\n",
           f"Device: {info.get('gpu') or info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
           f"torch {info['torch']}, transformers {info.get('transformers')}, trl {info.get('trl')}, {info['date']}. "
           f"Command: `{command}`\n"]
    for method, variants in CASES.items():
        rs = {r["variant"]: r for r in results if r.get("method") == method}
        if not rs:
            continue
        base = rs.get("plain") or next(iter(rs.values()))
        rows = []
        for v in variants:
            r = rs.get(v)
            if r is None:
                continue
            if "error" in r:
                rows.append([v, "error", "", "", "", "", r["error"][-120:].replace("\n", " ")])
                continue
            extra = f"cache built in {r['cache_build_s']:.1f} s" if "cache_build_s" in r else ""
            if (r.get("other_load") or 0) >= 0.3:
                extra += f" CONTENDED: other processes used {r['other_load']:.2f} cores"
            rows.append([v, f"{r['median_s']:.2f}", " ".join(f"{s:.2f}" for s in r["seconds"]),
                         f"{r['tokens_per_s']:.0f}", f"{base['median_s'] / r['median_s']:.2f}x",
                         C.gb(r["peak_bytes"]), extra])
        out.append(f"\n## {method}\n")
        out.append(C.table(["variant", "median step s", "steps s", "tokens/s", f"speed vs {base['variant']}",
                            "peak RSS GB", "note"], rows))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--variants", nargs="*", default=None, help="only these variants (e.g. fused trl-gkd)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="train.compile_loss=true for our fused variants")
    ap.add_argument("--name", default="step")
    a = ap.parse_args(argv)
    if a.case:
        C.emit(run_one(json.loads(a.case)))
        return
    info = C.device_info()
    results = []
    for method in a.cases:
        for v in CASES[method]:
            if a.variants and v not in a.variants:
                continue
            case = {"method": method, "variant": v, "steps": a.steps, "chunk_size": a.chunk_size, "compile": a.compile}
            r = C.run_case(__file__, case)
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("method", "variant", "median_s", "seconds", "peak_bytes", "error")}),
                  flush=True)
    C.report(a.name, __file__, info, results, markdown)


if __name__ == "__main__":
    main()
