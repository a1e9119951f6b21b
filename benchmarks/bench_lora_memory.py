"""Memory and step time of off-policy AlignDistil: three full models vs one base plus LoRA adapters.

One optimizer step of off-policy AlignDistil (adaptive teacher, fused loss path, fp32) in two
set-ups, each in its own process:

- ``full``: the policy fully fine-tuned (float32 weights, gradients, AdamW states) and the
  DPO and reverse-DPO teachers loaded as two more full models;
- ``lora``: ``model.lora`` (r 16, every linear layer): ONE base model, the policy's trainable
  adapter, and the two teachers as named frozen adapters on the same base (as a stage trained
  with ``model.lora`` saves them), switched in per forward pass.

Models: SmolLM2-135M (the embedded model) and a randomly initialised model at Qwen2.5-1.5B's
widths (hidden 1536, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151,936, tied
embeddings) with ``--qwen-layers`` layers (default 6 of the real 28: three full models of 28
layers in fp32 with AdamW states need about 37 GB, beyond this machine's 24 GB, and a step
would take minutes on 2 cores). Its tokenizer is SmolLM2's (ids stay below 49,152; the head
keeps all 151,936 rows, which is what costs memory and time). The teachers' adapters are
random (``init_lora_weights=False``): their values do not change memory or time.

Reported per case: the peak resident memory of the whole process (CPU: ``VmHWM``, what the
models, optimizer states and the step held at their peak; GPU: ``max_memory_allocated``),
the resident memory after set-up (models loaded, before the first step), and the median
time of the timed steps after one warm-up step; then the lora/full ratios.

    python benchmarks/bench_lora_memory.py                      # -> benchmarks/results/lora-memory.{json,md}
    python benchmarks/bench_lora_memory.py --models smollm2 --steps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from bench_step import write_data  # noqa: E402

MODELS = {
    # name: (batch size, max_length: prompt 32 + response tokens)
    "smollm2": (4, 32 + 256),
    "qwen1.5b-dims": (2, 32 + 128),
}
SETUPS = ("full", "lora")
LORA = ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=[all-linear]"]


# ----------------------------------------------------------------------------- inputs (made once, in their own process)
def prepare(work: Path, qwen_layers: int) -> dict:
    """Model folders, teacher adapters and data for every case; returns their paths."""
    import torch
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligndistil.model.loading import load_causal_lm, load_tokenizer
    from aligndistil.model.lora import recorded_base

    tok = load_tokenizer("smollm2")
    out = {}
    qwen = work / "qwen1.5b-dims"
    if not (qwen / "config.json").is_file():
        conf = AutoConfig.for_model(
            "qwen2", hidden_size=1536, num_hidden_layers=qwen_layers, num_attention_heads=12, num_key_value_heads=2,
            intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(conf).save_pretrained(qwen, safe_serialization=True)
        tok.save_pretrained(qwen)
    for name, base in (("smollm2", "smollm2"), ("qwen1.5b-dims", str(qwen))):
        adapters = []
        model = None
        for i, role in enumerate(("dpo", "reverse_dpo")):
            folder = work / f"{name}-{role}-adapter"
            if not (folder / "adapter_config.json").is_file():
                model = model or load_causal_lm(base)
                torch.manual_seed(1 + i)
                pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                init_lora_weights=False))
                pm.peft_config["default"].base_model_name_or_path = recorded_base(base)
                pm.save_pretrained(folder, safe_serialization=True)
                tok.save_pretrained(folder)
                model = pm.unload()
            adapters.append(str(folder))
        bs, max_len = MODELS[name]
        data = write_data(work / f"{name}-data.jsonl", tok, n=bs * 8)
        out[name] = {"base": base, "dpo_adapter": adapters[0], "rev_adapter": adapters[1], "data": str(data)}
    return out


# ----------------------------------------------------------------------------- one case
def run_one(case: dict) -> dict:
    import torch

    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.train.loop import Trainer

    torch.manual_seed(0)
    inp = case["inputs"]
    bs, max_len = MODELS[case["model"]]
    with tempfile.TemporaryDirectory() as d:
        opts = [f"model.policy={inp['base']}", f"data.train_file={inp['data']}", f"data.max_length={max_len}",
                "data.max_prompt_length=64", f"train.output_dir={Path(d) / 'out'}", f"train.max_steps={case['steps'] + 1}",
                f"train.per_device_batch_size={bs}", "train.learning_rate=1e-6", "train.warmup_ratio=0",
                "train.progress_bar=false", "method.name=aligndistil", "method.mode=off_policy",
                "method.teacher=adaptive"]
        if case["setup"] == "lora":
            opts += LORA + [f"model.dpo_model={inp['dpo_adapter']}", f"model.reverse_dpo_model={inp['rev_adapter']}"]
        else:  # the same base as two more full models (what a full fine-tuned DPO stage would be)
            opts += [f"model.dpo_model={inp['base']}", f"model.reverse_dpo_model={inp['base']}"]
        trainer = Trainer(apply_overrides(RunConfig(), opts))
        trainer.setup()
        after_setup = _resident()
        trainer.policy.train()
        n_params = sum(p.numel() for p in trainer.policy.parameters())
        n_train = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
        times = []
        trainer.train_step(0)  # warm-up: allocates the AdamW states
        for step in range(1, case["steps"] + 1):
            dt, _ = C.timed(lambda: trainer.train_step(step))
            times.append(dt)
        peak, how = _peak()
        frozen = {r: type(m).__name__ for r, m in trainer.frozen.items()}
    return {**{k: v for k, v in case.items() if k != "inputs"}, "seconds": times, "median_s": statistics.median(times),
            "peak_bytes": peak, "after_setup_bytes": after_setup, "memory_how": how, "policy_parameters": n_params,
            "trainable_parameters": n_train, "frozen": frozen, "batch_size": bs, "max_length": max_len}


def _resident() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return (C._status_kb("VmRSS") or 0) * 1024


def _peak() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated (whole process)"
    return (C._status_kb("VmHWM") or 0) * 1024, "peak RSS of the whole process (VmHWM)"


# ----------------------------------------------------------------------------- report
def markdown(results: list[dict], info: dict, command: str) -> str:
    out = ["# Off-policy AlignDistil: three full models vs one base plus LoRA adapters\n",
           f"Device: {info.get('gpu') or info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
           f"torch {info['torch']}, transformers {info.get('transformers')}, {info['date']}. Command: `{command}`\n",
           "One step = forward of the policy and both teachers, fused loss, backward, AdamW, fp32. "
           "`full`: policy + two full teachers; `lora`: one base + policy adapter (r 16, all linear layers) "
           "+ two teacher adapters. Memory: peak of the whole process.\n"]
    rows = []
    for model in MODELS:
        rs = {r["setup"]: r for r in results if r.get("model") == model}
        for s in SETUPS:
            r = rs.get(s)
            if r is None:
                continue
            if "error" in r:
                rows.append([model, s, "error", "", "", "", "", r["error"][-160:].replace("\n", " ").replace("|", "/")])
                continue
            note = f"layers: {r['layers']}" if r.get("layers") else ""
            if (r.get("other_load") or 0) >= 0.3:
                note += f" CONTENDED: other processes used {r['other_load']:.2f} cores"
            rows.append([model, s, C.gb(r["peak_bytes"]), C.gb(r["after_setup_bytes"]), f"{r['median_s']:.2f}",
                         f"{r['trainable_parameters']:,}", ", ".join(f"{k}: {v}" for k, v in r["frozen"].items()), note])
        if all(s in rs and "error" not in rs[s] for s in SETUPS):
            f, lo = rs["full"], rs["lora"]
            rows.append([model, "**lora / full**", f"**{lo['peak_bytes'] / f['peak_bytes']:.2f}**",
                         f"{lo['after_setup_bytes'] / f['after_setup_bytes']:.2f}",
                         f"**{lo['median_s'] / f['median_s']:.2f}**", "", "", ""])
    out.append(C.table(["model", "set-up", "peak GB", "after set-up GB", "median step s", "trainable params",
                        "frozen roles", "note"], rows))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), help="models to measure")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--qwen-layers", type=int, default=6,
                    help="layers of the Qwen2.5-1.5B-width model (the real one has 28; see the module docstring)")
    ap.add_argument("--work", default=None, help="folder for the generated models and adapters (default: a temp folder)")
    ap.add_argument("--name", default="lora-memory", help="results/<name>.{json,md}")
    a = ap.parse_args(argv)
    if a.case:
        C.emit(run_one(json.loads(a.case)))
        return
    if a.prepare:
        spec = json.loads(a.prepare)
        C.emit(prepare(Path(spec["work"]), spec["qwen_layers"]))
        return
    info = C.device_info()
    with tempfile.TemporaryDirectory() as d:
        work = Path(a.work or d)
        work.mkdir(parents=True, exist_ok=True)
        # The inputs are made in a process of their own, so that no case's peak includes them.
        inputs = _prepare_in_subprocess(work, a.qwen_layers)
        results = []
        for model in a.models:
            for setup in SETUPS:
                case = {"model": model, "setup": setup, "steps": a.steps, "inputs": inputs[model],
                        "layers": a.qwen_layers if model != "smollm2" else None}
                r = C.run_case(__file__, case)
                r.pop("inputs", None)
                results.append(r)
                print(json.dumps({k: r.get(k) for k in ("model", "setup", "median_s", "peak_bytes", "after_setup_bytes",
                                                        "error")}), flush=True)
    C.report(a.name, __file__, info, results, markdown)


def _prepare_in_subprocess(work: Path, layers: int) -> dict:
    import os
    import subprocess

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, __file__, "--prepare", json.dumps({"work": str(work), "qwen_layers": layers})],
                         capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"preparing the inputs failed:\n{res.stderr[-3000:]}")


if __name__ == "__main__":
    main()
