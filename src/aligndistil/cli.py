"""The ``aligndistil`` command line.

Subcommands map one to one onto library functions, so anything the CLI does can be done
from Python too. Errors a user can fix (a bad config key, a malformed data line, a missing
model) print one clear line and exit with code 2; a run stopped by a non-finite loss exits
with code 3 and names the step and the last good checkpoint; Ctrl-C exits with 130 (naming
the checkpoint to resume from), output cut by a closed pipe with 141, quietly.
"""

from __future__ import annotations

import argparse
import json
import sys

from aligndistil.errors import EXIT_DIVERGED, EXIT_USAGE, AlignDistilError  # noqa: F401  (EXIT_DIVERGED: documented exit code)


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
    p.add_argument("--overwrite", action="store_true",
                   help="let a fresh run write into a train.output_dir that holds another run or other files "
                        "(same as train.overwrite_output_dir=true)")
    _add_overrides(p)

    p = sub.add_parser("pipeline", help="run a multi-stage pipeline (DPO -> reverse DPO -> AlignDistil ...)",
                       description="Run the stages of a pipeline file in order; stages already complete "
                                   "with the same config are skipped.")
    p.add_argument("--config", "-c", required=True,
                   help="pipeline YAML (output_dir, base, stages), e.g. configs/pipelines/paper.yaml; a stage's "
                        "relative config: path is looked up next to it, then in configs/")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder instead of the file's output_dir: stage NAME writes to DIR/NAME and "
                        "stage:NAME references read from there (train.output_dir is refused)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve everything a run would (overrides included), print per stage its effective "
                        "config (differences from the defaults), output folder and whether it would run or be "
                        "skipped, and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="[STAGE:]section.key=value",
                   help="override config values: section.key=value for every stage that uses the key (a global "
                        "method.* or teacher key a stage's method does not use is dropped for that stage, so its "
                        "fingerprint is unchanged), STAGE:section.key=value for one stage "
                        "(e.g. aligndistil_on_policy:method.max_new_tokens=32)")

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
    p.add_argument("--device", default="auto",
                   help="where the model samples: auto (the first CUDA GPU if there is one, else the CPU), cpu, "
                        "cuda or cuda:N (default: auto)")
    p.add_argument("--no-chat-template", action="store_true", help="use prompts as raw text instead of one chat user message")
    p.add_argument("--skip-if-complete", action="store_true",
                   help="do nothing if OUT is already complete with the same settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("eval", help="evaluate models: ground-truth reward, KL, length, distinct-2, reward accuracy",
                       description="Generate on the test prompts with a fixed seed and report, per model, the mean "
                                   "ground-truth reward (95% interval), sequence KL to the reference and to the DPO model "
                                   "(tokenwise, with the Monte-Carlo estimate beside it), mean response length and distinct-2; on held-out pairs, the reward "
                                   "accuracy of the DPO reward, the contrastive reward and a reward model. Writes "
                                   "results.json, results.md, samples/ and PNG plots to --out.")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="models to evaluate, as NAME=PATH (or just PATH; the name is then the folder name)")
    p.add_argument("--reference", default="smollm2", help="reference model pi_ref (default: smollm2)")
    p.add_argument("--dpo-model", default=None, help="DPO model pi_dpo (KL to DPO, DPO reward accuracy)")
    p.add_argument("--reverse-dpo-model", default=None, help="reverse-DPO model pi_rev (contrastive reward accuracy)")
    p.add_argument("--prompts", default="sentiment:test",
                   help="test prompts: a shipped set, a .txt file (one prompt per line), or training data (.jsonl, a "
                        "dataset folder or hub:ORG/NAME) whose records give a prompt (string or messages; "
                        "chosen/rejected conversations give their shared prompt) (default: sentiment:test)")
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
    p.add_argument("--device", default="auto",
                   help="where the models run: auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda "
                        "or cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the models' weights; bfloat16 is faster on a GPU (default: float32)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="use prompts as raw text (default: the chat template when the reference's tokenizer has one, "
                        "a string prompt as one user message: training's data.use_chat_template=null rule)")
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
                        "model|data|train|method.KEY=V apply to every training stage whose method uses the key")

    p = sub.add_parser("study", help="run a study of the paper: convergence (AlignDistil Fig. 2), frontier (reward vs KL)",
                       description="Run one of the paper's studies end to end; finished runs are skipped on a rerun.")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY",
                               help="which study: convergence (on-policy AlignDistil vs token- and sentence-level REINFORCE), "
                                    "frontier (reward against KL for every method; AlignDistil Tables 2 and 3)")
    q = studies.add_parser("convergence", help="AlignDistil vs token- and sentence-level REINFORCE: reward vs step",
                           description="Sec. 6.5 / Fig. 2 / App. E: on-policy AlignDistil (static alpha = beta0/beta), "
                                       "token-level and sentence-level REINFORCE with the contrastive reward, all at the "
                                       "same beta, prompts, batch, learning rate, steps and seeds. Reuses the quickstart's "
                                       "DPO and reverse-DPO models when they are finished (else trains them as the "
                                       "quickstart does). Writes results.md (the table), results.json, convergence.png and "
                                       "vader.png to --out.")
    q.add_argument("--out", default="outputs/convergence", help="output folder (default: outputs/convergence)")
    q.add_argument("--tiny", action="store_true",
                   help="the test-sized study: the tiny random model, its synthetic pairs, teachers trained on them, "
                        "6 steps (seconds; proves the machinery, not the claim)")
    q.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds, one run per method each (default: 0 1)")
    q.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 30)")
    q.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: 4)")
    q.add_argument("--lr", type=float, default=None, help="learning rate, constant (default: 2e-5)")
    q.add_argument("--max-new-tokens", type=int, default=None, help="tokens sampled per response at most (default: 24)")
    q.add_argument("--max-prompts", type=int, default=None, help="prompts of the set to train on (default: 120, one per sample of 30 steps x 4)")
    q.add_argument("--prompts", default=None, help="prompt set or file (default: sentiment:train)")
    q.add_argument("--beta", type=float, default=None, help="KL weight to pi_dpo, every method (default: 0.08, the paper's)")
    q.add_argument("--smooth", type=int, default=None, help="trailing mean over this many steps for the table (default: 5)")
    q.add_argument("--quickstart-config", default=None,
                   help="quickstart file whose teachers to reuse or train (default: configs/pipelines/quickstart.yaml)")
    q.add_argument("--dpo-model", default=None, help="DPO model folder instead of the quickstart's")
    q.add_argument("--reverse-dpo-model", default=None, help="reverse-DPO model folder instead of the quickstart's")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every run (e.g. train.gradient_checkpointing=true)")
    from aligndistil.workflows.frontier_command import add_frontier_parser

    add_frontier_parser(studies)

    from aligndistil.workflows.judge.command import add_judge_parser

    add_judge_parser(sub)
    p = sub.add_parser("merge", help="merge a LoRA-trained stage (an adapter folder) into a full HF model folder",
                       description="Merge a LoRA adapter folder (a run trained with model.lora) into the base it "
                                   "records and save a plain Hugging Face model folder (safetensors + tokenizer).")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="the adapter folder (holds adapter_config.json)")
    p.add_argument("--out", required=True, help="the merged model folder to write (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights: float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds something")
    return parser


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _quiet_deepspeed_on_cpu() -> None:
    """When DeepSpeed is installed, transformers imports it, and on a machine without a GPU it
    announces on STDOUT that it falls back to the CPU, a line that would land in the middle of
    a command's output (make-tiny's JSON). Naming the CPU backend up front, as DeepSpeed's
    ``DS_ACCELERATOR`` allows, keeps it quiet; a GPU machine and an explicit setting are left alone."""
    import importlib.util
    import os

    if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code. Output cut short by a closed pipe
    (``config-help | head``) ends quietly, Ctrl-C outside training with one line."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, where it can still be handled
        return code
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("aligndistil: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from aligndistil.config import help_text, load_config

    try:
        if args.command == "config-help":
            print(help_text())
            return 0
        _quiet_deepspeed_on_cpu()  # after --help and config-help, which need no torch (it costs 2 s to import)
        if args.command == "judge":
            from aligndistil.workflows.judge.command import run_judge_command

            return run_judge_command(args)
        if args.command == "merge":
            from aligndistil.workflows.merge import merge_adapter

            merge_adapter(args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
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
                       progress=not args.no_progress, skip_if_complete=args.skip_if_complete, device=args.device)
            return 0
        if args.command == "eval":
            from aligndistil.workflows.evaluate import evaluate

            res = evaluate(_parse_models(args.models), reference=args.reference, out_dir=args.out,
                           dpo_model=args.dpo_model, reverse_dpo_model=args.reverse_dpo_model, prompts=args.prompts,
                           reward=args.reward, pairs=args.pairs, reward_model=args.reward_model, beta0=args.beta0,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
                           use_chat_template=False if args.no_chat_template else None, plots=not args.no_plots,
                           runs=_parse_models(args.runs) if args.runs else None, progress=not args.no_progress,
                           device=args.device, dtype=args.dtype)
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
            train(cfg, resume=args.resume, overwrite=args.overwrite)
            return 0
        if args.command == "study" and args.study == "frontier":
            from aligndistil.workflows.frontier_command import run_frontier_command

            return run_frontier_command(args)
        if args.command == "study":
            from aligndistil.workflows.convergence import TINY, StudySettings, run_convergence

            given = dict(seeds=tuple(args.seeds) if args.seeds else None, steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.lr, max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts,
                         prompts=args.prompts, beta=args.beta, smooth=args.smooth)
            # Options not given keep the study's defaults (or the tiny study's, with --tiny).
            run_convergence(StudySettings(**{
                **(TINY if args.tiny else {}), **{k: v for k, v in given.items() if v is not None},
                "out_dir": args.out, "quickstart_config": args.quickstart_config, "dpo_model": args.dpo_model,
                "reverse_dpo_model": args.reverse_dpo_model, "extra": list(args.overrides)}), progress=not args.no_progress)
            return 0
        if args.command == "pipeline":
            from aligndistil.workflows.pipeline import run_pipeline

            if args.dry_run:
                from aligndistil.workflows.pipeline_plan import format_plan, plan

                p = plan(args.config, args.overrides, out=args.out)
                print(json.dumps(p, indent=2) if args.json else format_plan(p))
                return EXIT_USAGE if p["problems"] else 0
            run_pipeline(args.config, args.overrides, out=args.out)
            return 0
    except AlignDistilError as e:
        # Every known failure kind carries its own exit code and label (aligndistil.errors).
        print(f"aligndistil: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"aligndistil: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as e:
        # A folder that cannot be written (read-only, a path under a file): one line naming it.
        what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        print(f"aligndistil: file error: {what}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, ImportError, FileExistsError) as e:
        # Argument checks in the library raise plain ValueError (a wrong beta, an unknown
        # method name); a missing optional package raises ImportError naming its extra.
        print(f"aligndistil: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 1


if __name__ == "__main__":
    sys.exit(main())
