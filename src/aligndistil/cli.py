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


def _parse_models(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` (or ``PATH``) items -> an ordered ``{name: path}``; names must be unique."""
    from pathlib import Path

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name or item, item
        if not name or not path:
            raise ValueError(f"--models: {item!r} must look like NAME=PATH")
        if name in out:
            raise ValueError(f"--models: the name {name!r} is given twice")
        out[name] = path
    return out


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

    p = sub.add_parser("make-prefs", help="sample responses, score them with a reward, write preference pairs",
                       description="For every prompt sample k responses from a model, score them with a reward and "
                                   "write {prompt, chosen, rejected} JSONL (best vs worst; near-ties skipped and counted), "
                                   "with a JSON sidecar (<name>.meta.json) recording the seed, generation settings and "
                                   "counts. Both are written atomically; the sidecar last marks the output complete.")
    p.add_argument("--model", default="smollm2", help="model to sample from: local HF folder, hub id, or smollm2 "
                                                      "(the embedded SmolLM2-135M-Instruct; default)")
    p.add_argument("--prompts", default="sentiment:train",
                   help="prompt file (one per line) or shipped set sentiment:train / sentiment:test (default: sentiment:train)")
    p.add_argument("--out", required=True, help="JSONL file to write (its sidecar goes beside it)")
    p.add_argument("--reward", default="vader", help="reward spec: vader, bt:<reward model folder>, or module:function (default: vader)")
    p.add_argument("-k", "--num-samples", dest="k", type=int, default=2, help="responses sampled per prompt, >= 2 (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per response at most (default: 40)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--tie-threshold", type=float, default=0.05,
                   help="skip a prompt when best and worst rewards differ by less than this (default: 0.05)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="samples generated together (default: 32)")
    p.add_argument("--no-chat-template", action="store_true", help="use prompts as raw text instead of one chat user message")
    p.add_argument("--skip-if-complete", action="store_true",
                   help="do nothing if OUT is already complete with the same settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("eval", help="evaluate models: ground-truth reward, KL, length, distinct-2, reward accuracy",
                       description="Generate on the test prompts with a fixed seed and report, per model, the mean "
                                   "ground-truth reward (95%% interval), Monte-Carlo sequence KL to the reference and to "
                                   "the DPO model, mean response length and distinct-2; on held-out pairs, the reward "
                                   "accuracy of the DPO reward, the contrastive reward and a reward model. Writes "
                                   "results.json, results.md, samples/ and PNG plots to --out.")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="models to evaluate, as NAME=PATH (or just PATH; the name is then the folder name)")
    p.add_argument("--reference", default="smollm2", help="reference model pi_ref (default: smollm2)")
    p.add_argument("--dpo-model", default=None, help="DPO model pi_dpo (KL to DPO, DPO reward accuracy)")
    p.add_argument("--reverse-dpo-model", default=None, help="reverse-DPO model pi_rev (contrastive reward accuracy)")
    p.add_argument("--prompts", default="sentiment:test", help="test prompts: file or shipped set (default: sentiment:test)")
    p.add_argument("--reward", default="vader", help="ground-truth reward spec (default: vader)")
    p.add_argument("--pairs", default=None, help="held-out preference pairs (JSONL) for reward accuracy")
    p.add_argument("--reward-model", default=None, help="reward spec (e.g. bt:<folder>) whose accuracy on --pairs to report")
    p.add_argument("--beta0", type=float, default=0.1, help="beta of the DPO models (scales implicit rewards; default: 0.1)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per response at most (default: 40)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default: 1.0; the KL estimate is unbiased only at 1.0 with top-p 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed, the same for every model (default: 1234)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per test prompt (default: 1)")
    p.add_argument("--batch-size", type=int, default=42, help="samples generated together (default: 42)")
    p.add_argument("--no-chat-template", action="store_true", help="use prompts as raw text instead of one chat user message")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--runs", nargs="*", default=None, metavar="NAME=PATH",
                   help="training-run folders (with metrics.jsonl) for the training-curve plot "
                        "(default: the evaluated model folders that have one)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("train-rm", help="train a Bradley-Terry reward model (use it as reward bt:<folder>)",
                       description="Train a causal LM body with a scalar head on preference pairs with the loss "
                                   "-log sigma(r(chosen) - r(rejected)). The folder it writes is a reward: bt:<folder>.")
    p.add_argument("--model", default="smollm2", help="initial body: local HF folder, hub id, or smollm2 (default)")
    p.add_argument("--pairs", required=True, help="{prompt, chosen, rejected} JSONL (e.g. from make-prefs)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default 0: derive from --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the pairs when --steps is 0 (default: 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: 8)")
    p.add_argument("--max-length", type=int, default=256, help="prompt + response tokens at most (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="head initialisation and data order (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("quickstart", help="the whole method end to end: pairs, DPO, reverse DPO, AlignDistil, baselines, eval",
                       description="Sample preference pairs from the initial model (scored by the ground-truth reward), "
                                   "train DPO, reverse DPO, AlignDistil off- and on-policy and the baselines, then "
                                   "evaluate them all and print the table. Finished steps are skipped on a rerun.")
    p.add_argument("--config", "-c", default=None,
                   help="quickstart file (default: configs/pipelines/quickstart.yaml; "
                        "configs/pipelines/full.yaml is the longer frontier run)")
    p.add_argument("--model", default=None, help="initial model instead of the file's base.model.policy "
                                                 "(local HF folder or hub id with a chat template)")
    p.add_argument("--out", default=None, help="output folder instead of the file's output_dir")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="prefs.KEY=V / heldout.KEY=V / eval.KEY=V / reward=V change those sections; "
                        "model|data|train|method.KEY=V apply to every training stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aligndistil.config import ConfigError, help_text, load_config

    try:
        if args.command == "config-help":
            print(help_text())
            return 0
        if args.command == "make-tiny":
            from aligndistil.model.tiny import make_tiny_workspace

            print(json.dumps(make_tiny_workspace(args.out, seed=args.seed), indent=2))
            return 0
        if args.command == "make-prefs":
            from aligndistil.workflows.make_prefs import make_prefs

            make_prefs(args.model, args.prompts, args.out, reward=args.reward, k=args.k,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, tie_threshold=args.tie_threshold, max_prompts=args.max_prompts,
                       batch_size=args.batch_size, use_chat_template=not args.no_chat_template,
                       progress=not args.no_progress, skip_if_complete=args.skip_if_complete)
            return 0
        if args.command == "eval":
            from aligndistil.workflows.evaluate import evaluate

            res = evaluate(_parse_models(args.models), reference=args.reference, out_dir=args.out,
                           dpo_model=args.dpo_model, reverse_dpo_model=args.reverse_dpo_model, prompts=args.prompts,
                           reward=args.reward, pairs=args.pairs, reward_model=args.reward_model, beta0=args.beta0,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
                           use_chat_template=not args.no_chat_template, plots=not args.no_plots,
                           runs=_parse_models(args.runs) if args.runs else None, progress=not args.no_progress)
            from aligndistil.workflows.evaluate import format_table

            print(format_table(res))
            return 0
        if args.command == "train-rm":
            from aligndistil.rewards.bradley_terry import train_reward_model

            train_reward_model(args.model, args.pairs, args.out, steps=args.steps, epochs=args.epochs,
                               learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                               max_prompt_length=max(1, args.max_length // 2), seed=args.seed,
                               progress=not args.no_progress)
            return 0
        if args.command == "quickstart":
            from aligndistil.workflows.quickstart import default_config, run_quickstart

            run_quickstart(args.config or default_config(), args.overrides, model=args.model, output_dir=args.out,
                           progress=not args.no_progress)
            return 0
        if args.command == "train":
            from aligndistil.train.loop import train

            cfg = load_config(args.config, args.overrides)
            train(cfg, resume=args.resume)
            return 0
        if args.command == "pipeline":
            from aligndistil.workflows.pipeline import run_pipeline, stage_summary

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
        from aligndistil.workflows.evaluate import EvalError
        from aligndistil.model.loading import ModelLoadError
        from aligndistil.workflows.make_prefs import PrefsError
        from aligndistil.rewards import RewardError
        from aligndistil.train.loop import TrainingError

        if isinstance(e, TrainingError):
            print(f"aligndistil: training stopped: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if isinstance(e, (PrefsError, EvalError, RewardError, ModelLoadError, ImportError, FileExistsError)):
            print(f"aligndistil: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, ValueError):
            print(f"aligndistil: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
