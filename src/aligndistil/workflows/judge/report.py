"""The judge's outputs: ``results.json``, ``results.md`` (Markdown tables) and ``win_rates.png``.

Every file is written atomically and only once all judging is done, so a folder either
has a complete result or none (the answer and request caches beside it are separate).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from aligndistil.fileio import atomic_write_text

__all__ = ["format_tables", "plot_win_rates", "write_report"]


def _pct(x: float, nd: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{nd}f}"


def _num(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def format_tables(results: dict) -> str:
    """Markdown: the pairwise table (win rate, LC win rate, counts, lengths) and the
    single-grade table, whichever the run produced, with a line on how it was judged."""
    lines = []
    how = results.get("judge") or {}
    if how.get("reward"):
        lines.append(f"Judge-free: reward `{how['reward']}` (tie when rewards differ by <= {how.get('tie_eps', 0)}).")
    elif how:
        lines.append(f"Judge: `{how.get('model')}` at {how.get('base_url')}.")
    q = results.get("questions", {})
    lines.append(f"Questions: `{q.get('source')}` ({q.get('n')} questions, {q.get('turns')} turns).")
    lines.append("")
    pw = results.get("pairwise") or {}
    if pw:
        base = results.get("baseline")
        rule = ("the higher mean reward wins" if how.get("reward") else
                "judged in both orders; a win or loss needs both orders to agree")
        lines += [f"Pairwise against `{base}` ({rule}):", "",
                  "| model | win rate % (95% CI) | LC win rate % [95% CI] | wins | ties | losses | unparsed "
                  "| mean length (model / baseline, chars) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in pw.items():
            lc = r["lc"]
            lines.append(
                f"| {name} | {_pct(r['win_rate'])} ± {_pct(r['ci95'])} | {_pct(lc['lc_win_rate'])} "
                f"[{_pct(lc['ci_low'])}, {_pct(lc['ci_high'])}] | {r['wins']} | {r['ties']} | {r['losses']} "
                f"| {r['unparsed']} | {_num(r['mean_len_model'], 0)} / {_num(r['mean_len_baseline'], 0)} |")
        lines.append("")
    single = results.get("single") or {}
    if single:
        label = "mean reward" if how.get("reward") else "score 1-10"
        turns = sorted({t for r in single.values() for t in r.get("per_turn", {})}, key=int)
        head = f"| model | {label} (95% CI) | " + " | ".join(f"turn {t}" for t in turns) + " | n | unparsed |"
        lines += ["Single-answer grades:" if not how.get("reward") else "Mean reward per answer:", "", head,
                  "|" + "---|" * (4 + len(turns))]
        for name, r in single.items():
            per = " | ".join(_num(r["per_turn"].get(t, {}).get("mean", float("nan"))) for t in turns)
            lines.append(f"| {name} | {_num(r['mean'])} ± {_num(r['ci95'])} | {per} | {r['n']} | {r['unparsed']} |")
        lines.append("")
    models = results.get("models") or {}
    if models:
        lines.append("Chat templates: " + "; ".join(f"`{n}`: {m['template']}" for n, m in models.items()) + ".")
    unparsed = sum(r.get("unparsed", 0) for r in list(pw.values()) + list(single.values()))
    if unparsed:
        lines.append(f"{unparsed} judgment(s) had no verdict after the reminders: left out of the rates, not counted "
                     "as losses (see results.json).")
    return "\n".join(lines).rstrip() + "\n"


def plot_win_rates(results: dict, path: str | os.PathLike) -> Path | None:
    """Bars of each model's win rate and LC win rate against the baseline, with 95% intervals."""
    pw = results.get("pairwise") or {}
    if not pw:
        return None
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install matplotlib (or aligndistil[eval])") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(pw)
    xs = range(len(names))
    wr = [100 * r["win_rate"] for r in pw.values()]
    wr_err = [100 * r["ci95"] if math.isfinite(r["ci95"]) else 0.0 for r in pw.values()]
    lc = [100 * r["lc"]["lc_win_rate"] for r in pw.values()]
    lc_err = [[max(0.0, 100 * (r["lc"]["lc_win_rate"] - r["lc"]["ci_low"])) if math.isfinite(r["lc"]["ci_low"]) else 0.0
               for r in pw.values()],
              [max(0.0, 100 * (r["lc"]["ci_high"] - r["lc"]["lc_win_rate"])) if math.isfinite(r["lc"]["ci_high"]) else 0.0
               for r in pw.values()]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2), 3.6))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], wr, w, yerr=wr_err, capsize=4, label="win rate")
    ax.bar([x + w / 2 for x in xs], lc, w, yerr=lc_err, capsize=4, label="length-controlled")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"% preferred over {results.get('baseline')}")
    ax.set_title("Win rates (95% intervals)")
    ax.legend(fontsize=8)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _clean(x):
    # JSON has no NaN: write null instead, so that any JSON reader takes the file.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_report(results: dict, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and (with ``plots``) ``win_rates.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": str(atomic_write_text(out / "results.md", format_tables(results)))}
    if plots and results.get("pairwise"):
        files["plot"] = str(plot_win_rates(results, out / "win_rates.png"))
    # results.json last: its presence marks a finished run.
    files["json"] = str(atomic_write_text(out / "results.json", json.dumps(_clean(results), indent=2) + "\n"))
    return files
