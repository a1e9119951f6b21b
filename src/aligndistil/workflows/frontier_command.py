"""``aligndistil study frontier``: the flags of the frontier study and the call behind them."""

from __future__ import annotations

__all__ = ["add_frontier_parser", "run_frontier_command"]


def add_frontier_parser(studies) -> None:
    """Add the ``frontier`` subcommand to the ``study`` group's subparsers."""
    q = studies.add_parser(
        "frontier", help="reward against KL for every method at 3 strengths; AlignDistil Tables 2 and 3 in miniature",
        description="Train DPO, IPO, SimPO, TDPO1/2, SparsePO, MaPO and AlignDistil (off- and on-policy adaptive, "
                    "constant alpha, vanilla teacher) at several strengths on one set of pairs with one DPO / "
                    "reverse-DPO pair (the quickstart's, reused or trained as it trains them); evaluate each model "
                    "(VADER reward with a 95% interval over prompts, Monte-Carlo and tokenwise sequence KL to the "
                    "reference, checked to agree); write results.md / results.json (the reward interpolated at fixed "
                    "KL, Table 2 reward accuracy, Table 3 adaptive vs constant alpha) and frontier.png to --out. "
                    "Finished runs and evaluations are skipped on a rerun, interrupted runs resumed.")
    q.add_argument("--out", default=None, help="output folder (default: outputs/frontier)")
    q.add_argument("--config", "-c", default=None,
                   help="YAML file of study settings (FrontierSettings fields, e.g. grid, seeds, steps; "
                        "see configs/studies/frontier.yaml); flags override it")
    q.add_argument("--plan", action="store_true", help="print the grid, the runs and the estimated time, and exit")
    q.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                   help="pilot: run only these methods (dpo ipo simpo tdpo1 tdpo2 sparsepo mapo aligndistil_off "
                        "aligndistil_on aligndistil_const aligndistil_vanilla)")
    q.add_argument("--max-runs", type=int, default=None, help="pilot: run only the first N runs of the plan")
    q.add_argument("--tiny", action="store_true",
                   help="the test-sized study: the tiny random model, its synthetic pairs and teachers, 1 step a run "
                        "(seconds; proves the machinery, not the claims)")
    q.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds of the multi-seed methods; the others use the first (default: 0 1)")
    q.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 12, the quickstart's)")
    q.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-5, the quickstart's)")
    q.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per evaluation response and per on-policy sample (default: 24)")
    q.add_argument("--num-samples", type=int, default=None, help="evaluation samples per prompt (default: 1)")
    q.add_argument("--eval-max-prompts", type=int, default=None,
                   help="evaluate on the first N held-out prompts only (default: all 84)")
    q.add_argument("--kl-values", type=float, nargs="+", default=None,
                   help="KL values at which to interpolate every method's reward (default: 25/50/75%% of the "
                        "common KL range)")
    q.add_argument("--no-table2", action="store_true",
                   help="skip Table 2 (held-out pairs, the reward model and the reward accuracies)")
    q.add_argument("--quickstart-config", default=None,
                   help="quickstart file whose pairs and teachers to reuse or make (default: "
                        "configs/pipelines/quickstart.yaml)")
    q.add_argument("--dpo-model", default=None, help="DPO model folder instead of the quickstart's")
    q.add_argument("--reverse-dpo-model", default=None, help="reverse-DPO model folder instead of the quickstart's")
    q.add_argument("--train-file", default=None, help="training pairs instead of the quickstart's")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every run (e.g. train.loss_path=plain)")


def run_frontier_command(args) -> int:
    from aligndistil.workflows.frontier import format_plan, load_settings, run_frontier

    s = load_settings(args.config, out_dir=args.out, only=args.only, max_runs=args.max_runs,
                      tiny=True if args.tiny else None, seeds=args.seeds, steps=args.steps, learning_rate=args.lr,
                      max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                      eval_max_prompts=args.eval_max_prompts, kl_values=args.kl_values,
                      table2=False if args.no_table2 else None, quickstart_config=args.quickstart_config,
                      dpo_model=args.dpo_model, reverse_dpo_model=args.reverse_dpo_model, train_file=args.train_file,
                      extra=list(args.overrides) or None)
    if args.plan:
        print(format_plan(s))
        return 0
    run_frontier(s, progress=not args.no_progress)
    return 0
