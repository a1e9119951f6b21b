"""The ``aligndistil`` command line.

Subcommands map one to one onto library functions, so anything the CLI does can be done
from Python too. Errors a user can fix (a bad config key, a malformed data line, a missing
model) print one clear line and exit with code 2; a run stopped by a non-finite loss exits
with code 3 and names the step and the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE, EXIT_DIVERGED = 2, 3


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.learning_rate=1e-5 method.beta=0.2 "
                        "(see `aligndistil config-help` for every key)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligndistil",
        description="Token-level preference alignment of causal LMs: AlignDistil, TDPO, SparsePO/MaPO, DPO family.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one method from a YAML config",
                       description="Train one method. The config is a YAML file with sections model, data, "
                                   "train, method; values can be overridden as section.key=value.")
    p.add_argument("--config", "-c", required=True, help="YAML run config (e.g. configs/dpo.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in train.output_dir (exact: data order, "
                        "optimizer, scheduler and RNG are restored)")
    _add_overrides(p)

    p = sub.add_parser("pipeline", help="run a multi-stage pipeline (DPO -> reverse DPO -> AlignDistil ...)",
                       description="Run the stages of a pipeline file in order; stages already complete "
                                   "with the same config are skipped.")
    p.add_argument("--config", "-c", required=True, help="pipeline YAML (output_dir, base, stages)")
    p.add_argument("--dry-run", action="store_true", help="print each stage's status and exit")
    _add_overrides(p)

    p = sub.add_parser("make-tiny", help="build the tiny random model and synthetic data the tiny configs use",
                       description="Write DIR/model (a random 2-layer Llama with a character tokenizer), "
                                   "DIR/prefs.jsonl and DIR/kto.jsonl. Offline, about a second.")
    p.add_argument("--out", default="outputs/tiny", help="folder to write (default: outputs/tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")

    sub.add_parser("config-help", help="list every config key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError, help_text, load_config

    try:
        if args.command == "config-help":
            print(help_text())
            return 0
        if args.command == "make-tiny":
            from .tiny import make_tiny_workspace

            print(json.dumps(make_tiny_workspace(args.out, seed=args.seed), indent=2))
            return 0
        if args.command == "train":
            from .trainer import train

            cfg = load_config(args.config, args.overrides)
            train(cfg, resume=args.resume)
            return 0
        if args.command == "pipeline":
            from .pipeline import run_pipeline, stage_summary

            if args.dry_run:
                print(json.dumps(stage_summary(args.config), indent=2))
                return 0
            run_pipeline(args.config, args.overrides)
            return 0
    except ConfigError as e:
        print(f"aligndistil: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"aligndistil: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - map known failure kinds to exit codes
        from .trainer import TrainingError

        if isinstance(e, TrainingError):
            print(f"aligndistil: training stopped: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if isinstance(e, ValueError):
            print(f"aligndistil: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
