"""The evaluation's report: the Markdown tables of a results dict and the files written last.

:func:`aligndistil.workflows.evaluate.evaluate` computes the numbers; this module only lays
them out. The KL columns show the tokenwise estimate (the full-distribution KL summed over
the response, never negative) with the Monte-Carlo one beside it, and the table's footer
says what each is, so a negative Monte-Carlo value is read as sampling noise, not an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from aligndistil.fileio import atomic_write_text

__all__ = ["KL_FOOTER", "format_table", "run_info", "write_report"]

#: The table's footer: what the two KL estimates are.
KL_FOOTER = (
    "KL: tokenwise = mean over samples of sum_t KL(pi(.|s_t) || pi_other(.|s_t)) over the full "
    "vocabulary (never negative, lower variance); MC = mean of sum_t [log pi(y_t|s_t) - "
    "log pi_other(y_t|s_t)] on the same samples (unbiased at T=1 and top-p=1, but noisy: it can "
    "come out negative). Both estimate the sequence KL(pi || pi_other)."
)


def run_info(path: str) -> dict:
    """What a model folder says about its training run (config.yaml, COMPLETE.json)."""
    info: dict = {}
    p = Path(path)
    cfg = p / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            c = yaml.safe_load(cfg.read_text()) or {}
            m = c.get("method", {})
            info = {"method": m.get("name"), "beta": m.get("beta"), "reverse": m.get("reverse"),
                    "mode": m.get("mode"), "teacher": m.get("teacher"), "r": m.get("r")}
        except Exception:  # noqa: BLE001 - a broken config only loses the label
            info = {}
    done = p / "COMPLETE.json"
    if done.is_file():
        try:
            d = json.loads(done.read_text())
            info.update(steps=d.get("steps"), train_seconds=d.get("seconds"))
        except json.JSONDecodeError:
            pass
    return {k: v for k, v in info.items() if v is not None}


def _fmt(x, nd=3, sign=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if round(x, nd) == 0:
        x = 0.0  # no "-0.00" for a Monte-Carlo estimate that rounds to zero
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def format_table(results: dict) -> str:
    """The Markdown tables of a results dict (models, then held-out reward accuracy).

    Each KL column pair is ``tokenwise | MC``: ``kl_<role>_tokenwise`` and ``kl_<role>``.
    """
    s = results["settings"]
    head = (f"Ground truth: `{s['reward']}` on {s['n_prompts']} prompts of `{s['prompts']}` x {s['num_samples']} "
            f"sample(s), {s['max_new_tokens']} new tokens, T={s['temperature']}, top-p={s['top_p']}, seed {s['seed']}.")
    lines = [head]
    if s.get("chat_template"):
        lines.append(f"Prompts: {s['chat_template']}; training follows the same rule (data.use_chat_template).")
    lines += [
        "",
        "| model | reward (95% CI) | KL to ref | (MC) | KL to DPO | (MC) | length | distinct-2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | {_fmt(r['reward_mean'], sign=True)} ± {_fmt(r['reward_ci95'])} "
            f"| {_fmt(r.get('kl_ref_tokenwise'), 2)} | {_fmt(r.get('kl_ref'), 2)} "
            f"| {_fmt(r.get('kl_dpo_tokenwise'), 2)} | {_fmt(r.get('kl_dpo'), 2)} "
            f"| {_fmt(r['length_mean'], 1)} | {_fmt(r['distinct_2'])} |")
    lines += ["", KL_FOOTER]
    acc = results.get("reward_accuracy")
    if acc:
        lines += ["", f"Reward accuracy on {acc['n_pairs']} held-out pairs (`{acc['pairs']}`):", "",
                  "| reward | accuracy |", "|---|---|"]
        for key, label in (("dpo", "DPO reward β0·log π_dpo/π_ref"), ("contrastive", "contrastive β0·log π_dpo/π_rev"),
                           ("reward_model", f"reward model `{acc.get('reward_model_spec')}`")):
            if acc.get(key) is not None:
                lines.append(f"| {label} | {acc[key]:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: Path, plots: bool, runs: dict | None) -> None:
    """Plots, results.md, and last (it marks the report complete) results.json.

    ``runs``: training-run folders (name -> folder) for the training-curve plot; None: the
    evaluated models' folders that hold a ``metrics.jsonl``.
    """
    if plots:
        from aligndistil.workflows.plots import plot_frontier, plot_training_curves

        results["plots"] = {"frontier": str(plot_frontier(results, out_dir / "frontier.png"))}
        folders = runs if runs is not None else {n: r["path"] for n, r in results["models"].items()}
        curves = {n: Path(p) / "metrics.jsonl" for n, p in folders.items() if (Path(p) / "metrics.jsonl").is_file()}
        if curves:
            results["plots"]["training_curves"] = str(plot_training_curves(curves, out_dir / "training_curves.png"))
            results["plots"]["training_curve_runs"] = list(curves)
    atomic_write_text(out_dir / "results.md", format_table(results))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
