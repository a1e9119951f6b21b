"""PNG plots of an evaluation: the reward-vs-KL frontier and the training curves.

matplotlib runs on its file-only ``Agg`` backend (no display needed) and is imported only
when a plot is drawn. The frontier follows TDPO Fig. 3 / SparsePO Fig. 2: x is each model's
sequence KL to the reference (Monte-Carlo, on its own samples), y its mean ground-truth
reward with the 95% interval; models of one method (several beta values in the ``full``
configuration) are joined by a line in order of KL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["atomic_savefig", "method_label", "plot_frontier", "plot_training_curves", "pyplot", "read_metrics"]


def pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (or aligndistil[eval])") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def method_label(name: str, run: dict | None) -> str:
    """The group a model belongs to on the frontier: its training method (and mode), or its name."""
    run = run or {}
    m = run.get("method")
    if not m:
        return name
    if m == "dpo" and run.get("reverse"):
        return "reverse dpo"
    if m == "aligndistil":
        mode = (run.get("mode") or "").replace("_", "-")
        return f"aligndistil {mode}".strip()
    return m


def atomic_savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    return path


def plot_frontier(results: dict, path: str | os.PathLike) -> Path:
    """Mean reward (with 95% interval) against KL to the reference, one point per model."""
    plt = pyplot()
    groups: dict[str, list[tuple[float, float, float, str]]] = {}
    for name, r in results["models"].items():
        kl = r.get("kl_ref")
        if kl is None:
            continue
        ci = r.get("reward_ci95")
        ci = ci if ci is not None and ci == ci else 0.0
        groups.setdefault(method_label(name, r.get("run")), []).append((kl, r["reward_mean"], ci, name))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in groups.items():
        pts.sort()
        xs, ys, es, names = zip(*pts)
        line = "-o" if len(pts) > 1 else "o"
        ax.errorbar(xs, ys, yerr=es, fmt=line, capsize=3, label=label, markersize=6)
        if len(pts) == 1 or len(groups) <= 2:
            for x, y, n in zip(xs, ys, names):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    s = results.get("settings", {})
    ax.set_xlabel("sequence KL to the reference (nats, Monte-Carlo)")
    ax.set_ylabel(f"mean reward: {s.get('reward', 'reward')} (95% CI)")
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    try:
        return atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (blank or malformed lines are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def plot_training_curves(runs: dict[str, str | os.PathLike], path: str | os.PathLike,
                         keys: tuple[str, ...] = ("loss", "rewards/accuracies", "teacher_kl")) -> Path:
    """One panel per run: each of ``keys`` that the run logged, against the step.

    The loss is on the left axis; other logged keys share a right axis, since their scales
    differ from the loss's. Runs without a metrics file are left out.
    """
    plt = pyplot()
    data = {name: read_metrics(p) for name, p in runs.items() if Path(p).is_file()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        raise ValueError("no run has a non-empty metrics.jsonl to plot")
    n = len(data)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, data.items()):
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r.get("loss") for r in recs], color="C0", label="loss")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="C0")
        extra = [k for k in keys[1:] if any(k in r for r in recs)]
        if extra:
            ax2 = ax.twinx()
            for j, k in enumerate(extra):
                ax2.plot([r["step"] for r in recs if k in r], [r[k] for r in recs if k in r],
                         color=f"C{j + 1}", label=k, linestyle="--")
            ax2.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    try:
        return atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)
