"""Where the time of one training step goes: torch.profiler over one optimizer step.

Same model, batch and settings as ``bench_step.py`` (SmolLM2-135M, 4 x (32 + 256) tokens,
fp32, AdamW), one warm-up step, then one profiled step; prints the profiler's table sorted
by total CPU time and writes it to ``benchmarks/results/profile-<method>-<path>.txt``.
BENCHMARKS.md uses it to show that the fused AlignDistil step is matmul-bound.

    python benchmarks/profile_step.py                          # aligndistil, fused
    python benchmarks/profile_step.py --method tdpo2 --loss-path plain
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_step as BS  # noqa: E402
import common as C  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="aligndistil", choices=list(BS.CASES), help="method to profile")
    ap.add_argument("--loss-path", default="fused", choices=["fused", "plain"], help="train.loss_path")
    ap.add_argument("--rows", type=int, default=40, help="rows of the profiler table to keep")
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from aligndistil.config import RunConfig, apply_overrides
    from aligndistil.model.loading import load_tokenizer
    from aligndistil.train.loop import Trainer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = BS.write_data(tmp / "data.jsonl", load_tokenizer("smollm2"), n=16)
        opts = ["model.policy=smollm2", "model.dpo_model=smollm2", "model.reverse_dpo_model=smollm2",
                f"data.train_file={data}", "data.max_length=1024", "data.max_prompt_length=64",
                f"train.output_dir={tmp / 'out'}", "train.max_steps=3", "train.per_device_batch_size=4",
                "train.learning_rate=1e-6", "train.warmup_ratio=0", "train.progress_bar=false",
                f"train.loss_path={a.loss_path}", f"method.name={a.method}"]
        if a.method == "aligndistil":
            opts += ["method.mode=off_policy", "method.teacher=adaptive"]
        trainer = Trainer(apply_overrides(RunConfig(), opts))
        trainer.setup()
        trainer.policy.train()
        trainer.train_step(0)  # warm-up: allocates AdamW state
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            trainer.train_step(1)
            C.sync()
            wall = time.perf_counter() - t
    info = C.device_info()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows, max_name_column_width=60)
    text = (f"{a.method} ({a.loss_path}) one step: {wall:.2f} s wall under the profiler; "
            f"{info.get('gpu') or info['cpu']}, torch {info['torch']}, {info['date']}\n"
            f"Command: python benchmarks/profile_step.py {' '.join(sys.argv[1:])}\n\n{table}\n")
    from aligndistil.fileio import atomic_write_text

    C.RESULTS.mkdir(parents=True, exist_ok=True)
    out = atomic_write_text(C.RESULTS / f"profile-{a.method}-{a.loss_path}.txt", text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
