"""The frontier study's analysis: interpolation at fixed KL, the KL check, intervals, tables, plot.

Pure functions over the study's points (one per trained model), so that every number of
``results.md`` can be checked by hand (``tests/workflows/test_frontier.py``). A point is a
dict with ``method``, ``strength`` (its label), ``strength_index``, ``seed``, ``kl`` and
``kl_ci95`` (Monte-Carlo sequence KL to the reference, mean over prompts and its 95%
half-width), ``kl_tokenwise`` / ``kl_tokenwise_ci95``, ``reward`` / ``reward_ci95`` (mean
ground-truth reward over prompts and its 95% half-width) and ``kl_check`` (:func:`kl_agreement`).

Rules, stated once:

* Interpolation (:func:`interpolate_at`): one seed's points of one method, sorted by KL, are
  joined by straight lines; the reward at a fixed KL ``k`` is read off the segment whose ends
  bracket ``k``. Outside the seed's KL range there is no value (no extrapolation). The
  prompt-level half-width is interpolated the same way.
* Per method and fixed KL: the mean over seeds of the interpolated rewards; the interval over
  seeds is the min-max range (2 seeds: a t-interval with 1 degree of freedom would be 12.7
  standard deviations wide and say nothing more); the noise of the entry is
  ``max(prompt half-width, half the seed range)``.
* Two entries are told apart when their difference exceeds ``sqrt(h_a^2 + h_b^2)``; otherwise
  the comparison is "inside the noise".
* The fixed KL values: 25%, 50% and 75% of the common range (the intersection of every
  method's and seed's KL range); when there is none, of the range between the median of the
  lowest and the median of the highest KL, and methods that do not reach a value get no entry.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from aligndistil.workflows.eval_metrics import Z95, mean_ci95

__all__ = ["interpolate_at", "kl_agreement", "point_from_samples", "wilson_interval", "paired_bootstrap_diff", "fixed_kl_values",
           "frontier_table", "format_frontier", "format_table2", "format_table3", "plot_study_frontier"]


# ----------------------------------------------------------------------------- pure maths
def interpolate_at(points: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The value at ``kl`` on the broken line through ``points`` ``[(kl_i, y_i)]``, or None outside.

    Points are sorted by KL; two points at the same KL are averaged first.
    """
    by_kl: dict[float, list[float]] = {}
    for x, y in points:
        by_kl.setdefault(float(x), []).append(float(y))
    pts = sorted((x, sum(ys) / len(ys)) for x, ys in by_kl.items())
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= kl <= x1:
            return y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return pts[0][1]  # a single point, exactly at kl


def kl_agreement(mc: Sequence[float], tokenwise: Sequence[float]) -> dict:
    """Do the Monte-Carlo and tokenwise sequence KL of one model agree within their intervals?

    ``mc`` and ``tokenwise`` are per-prompt values (the same prompts, in the same order). Both
    estimate the same ``KL(pi || pi_ref)`` on the model's own samples, so their 95% intervals
    (:func:`mean_ci95`) must overlap: ``|mean_mc - mean_tw| <= h_mc + h_tw``. The paired
    difference ``mc - tw`` per prompt, with its own interval, is reported beside it.
    """
    if len(mc) != len(tokenwise) or not mc:
        raise ValueError(f"kl_agreement needs the same, non-zero number of values ({len(mc)} vs {len(tokenwise)})")
    m1, h1 = mean_ci95(mc)
    m2, h2 = mean_ci95(tokenwise)
    d, hd = mean_ci95([a - b for a, b in zip(mc, tokenwise)])
    h1, h2 = (h if math.isfinite(h) else 0.0 for h in (h1, h2))
    return {"mc": m1, "mc_ci95": h1, "tokenwise": m2, "tokenwise_ci95": h2, "diff": d,
            "diff_ci95": hd if math.isfinite(hd) else None, "agree": abs(m1 - m2) <= h1 + h2}


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` of a proportion ``correct / n`` (ties counted half may
    make ``correct`` a half-integer)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], clusters: Sequence, reps: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its 95% percentile interval, resampling CLUSTERS (prompts).

    ``a``, ``b``: per-pair scores (1 correct, 0 wrong, 0.5 tie) of two rewards on the same
    pairs; pairs of one prompt share a cluster and are resampled together, since they are not
    independent.
    """
    if not (len(a) == len(b) == len(clusters)) or not a:
        raise ValueError("paired_bootstrap_diff needs equal, non-zero lengths")
    groups: dict = {}
    for x, y, c in zip(a, b, clusters):
        groups.setdefault(c, []).append(x - y)
    sums = [(sum(g), len(g)) for g in groups.values()]
    rng = random.Random(seed)
    stats = []
    for _ in range(reps):
        draw = [sums[rng.randrange(len(sums))] for _ in sums]
        stats.append(sum(s for s, _ in draw) / sum(n for _, n in draw))
    stats.sort()
    return (sum(x - y for x, y in zip(a, b)) / len(a), stats[int(0.025 * reps)], stats[int(0.975 * reps) - 1])


def point_from_samples(records: Sequence[dict]) -> dict:
    """One model's point from its evaluation samples (``samples/<name>.jsonl`` records with
    ``prompt``, ``reward``, ``kl_ref``, ``kl_ref_tokenwise``): values are first averaged per
    prompt, so every interval is over prompts whatever the number of samples per prompt."""
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)

    def per_prompt(key):
        return [sum(r[key] for r in rs) / len(rs) for rs in by_prompt.values()]

    reward, h = mean_ci95(per_prompt("reward"))
    check = kl_agreement(per_prompt("kl_ref"), per_prompt("kl_ref_tokenwise"))
    return {"reward": reward, "reward_ci95": h if math.isfinite(h) else 0.0, "kl": check["mc"],
            "kl_ci95": check["mc_ci95"], "kl_tokenwise": check["tokenwise"], "kl_tokenwise_ci95": check["tokenwise_ci95"],
            "n_prompts": len(by_prompt), "samples_per_prompt": len(records) / len(by_prompt),
            "length": sum(r["n_tokens"] for r in records) / len(records), "kl_check": check}


# ----------------------------------------------------------------------------- the frontier table
def _lines(points: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """method -> seed -> its points."""
    out: dict[str, dict[int, list[dict]]] = {}
    for p in points:
        out.setdefault(p["method"], {}).setdefault(p["seed"], []).append(p)
    return out


def fixed_kl_values(points: list[dict], n: int = 3) -> tuple[list[float], tuple[float, float], bool]:
    """``(values, (lo, hi), common)``: ``n`` KL values at equal quantiles inside the common range."""
    ranges = [(min(p["kl"] for p in ps), max(p["kl"] for p in ps))
              for seeds in _lines(points).values() for ps in seeds.values()]
    if not ranges:
        return [], (math.nan, math.nan), False
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    common = lo < hi
    if not common:
        lows, highs = sorted(r[0] for r in ranges), sorted(r[1] for r in ranges)
        lo, hi = lows[len(lows) // 2], highs[len(highs) // 2]
        if lo >= hi:
            return [], (lo, hi), False
    return [lo + (hi - lo) * (i + 1) / (n + 1) for i in range(n)], (lo, hi), common


def frontier_table(points: list[dict], kl_values: Sequence[float], baseline: str = "dpo") -> dict:
    """Per method: the points by strength (seed means), and the reward interpolated at each KL."""
    table: dict = {}
    for method, seeds in _lines(points).items():
        by_strength: dict[int, list[dict]] = {}
        for ps in seeds.values():
            for p in ps:
                by_strength.setdefault(p["strength_index"], []).append(p)
        strengths = []
        for i in sorted(by_strength):
            ps = by_strength[i]
            strengths.append({"strength": ps[0]["strength"], "seeds": [p["seed"] for p in ps],
                              "kl": sum(p["kl"] for p in ps) / len(ps),
                              "kl_tokenwise": sum(p["kl_tokenwise"] for p in ps) / len(ps),
                              "reward": sum(p["reward"] for p in ps) / len(ps),
                              "reward_ci95": sum(p["reward_ci95"] for p in ps) / len(ps)})
        at = []
        for k in kl_values:
            vals = [(interpolate_at([(p["kl"], p["reward"]) for p in ps], k),
                     interpolate_at([(p["kl"], p["reward_ci95"]) for p in ps], k)) for ps in seeds.values()]
            vals = [v for v in vals if v[0] is not None]
            if len(vals) < len(seeds):  # a seed that does not reach k: no entry (no extrapolation)
                at.append(None)
                continue
            rs = [v[0] for v in vals]
            mean, h_prompt = sum(rs) / len(rs), sum(v[1] for v in vals) / len(vals)
            spread = (max(rs) - min(rs)) / 2
            at.append({"kl": k, "reward": mean, "per_seed": rs, "seed_range": [min(rs), max(rs)] if len(rs) > 1 else None,
                       "prompt_ci95": h_prompt, "noise": max(h_prompt, spread)})
        table[method] = {"strengths": strengths, "at_kl": at, "n_seeds": len(seeds)}
    _compare(table, len(kl_values), baseline)
    return table


def _compare(table: dict, n_kl: int, baseline: str) -> None:
    """Mark, at each KL, the best method, who is inside its noise, and each method against ``baseline``."""
    for j in range(n_kl):
        entries = {m: row["at_kl"][j] for m, row in table.items() if row["at_kl"][j] is not None}
        if not entries:
            continue
        best = max(entries, key=lambda m: entries[m]["reward"])
        for m, e in entries.items():
            b = entries[best]
            e["tied_with_best"] = m == best or (b["reward"] - e["reward"]) <= math.hypot(b["noise"], e["noise"])
            e["best"] = m == best
            base = entries.get(baseline)
            if base is not None and m != baseline:
                diff = e["reward"] - base["reward"]
                e["vs_baseline"] = {"diff": diff, "separated": abs(diff) > math.hypot(base["noise"], e["noise"])}


def _f(x, nd=3, sign=True):
    return "-" if x is None else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def format_frontier(table: dict, kl_values: Sequence[float], labels: dict[str, str], baseline: str = "dpo") -> str:
    """The Markdown tables: every point (seed means), then the reward at the fixed KL values."""
    lines = ["| method | strength | seeds | KL to ref (MC) | KL tokenwise | reward (95% CI over prompts) |",
             "|---|---|---|---|---|---|"]
    for m, row in table.items():
        for s in row["strengths"]:
            lines.append(f"| {labels.get(m, m)} | {s['strength']} | {len(s['seeds'])} | {s['kl']:.2f} | "
                         f"{s['kl_tokenwise']:.2f} | {s['reward']:+.3f} ± {s['reward_ci95']:.3f} |")
    if not kl_values:
        return "\n".join(lines + ["", "No KL value is reached by enough methods to compare at matched KL."])
    head = " | ".join(f"KL = {k:.3g}" for k in kl_values)
    lines += ["", f"Reward interpolated at fixed KL (mean over seeds [seed range] ± prompt 95% half-width; "
                  f"`*` best, `=` inside the best's noise; Δ vs {baseline}, `!` outside the noise):", "",
              f"| method | {head} |", "|---|" + "---|" * len(kl_values)]
    for m, row in table.items():
        cells = []
        for e in row["at_kl"]:
            if e is None:
                cells.append("out of range")
                continue
            rng = f" [{e['seed_range'][0]:+.3f}, {e['seed_range'][1]:+.3f}]" if e["seed_range"] else ""
            mark = "*" if e.get("best") else "=" if e.get("tied_with_best") else ""
            vs = e.get("vs_baseline")
            vs = f"; Δ {vs['diff']:+.3f}{'!' if vs['separated'] else ''}" if vs else ""
            cells.append(f"{e['reward']:+.3f}{rng} ± {e['prompt_ci95']:.3f} {mark}{vs}")
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("")
    for j, k in enumerate(kl_values):
        entries = {m: row["at_kl"][j] for m, row in table.items() if row["at_kl"][j] is not None}
        if not entries:
            continue
        best = next(m for m, e in entries.items() if e.get("best"))
        tied = [labels.get(m, m) for m, e in entries.items() if e.get("tied_with_best") and m != best]
        below = [labels.get(m, m) for m, e in entries.items() if not e.get("tied_with_best")]
        lines.append(f"- KL = {k:.3g}: highest {labels.get(best, best)} ({entries[best]['reward']:+.3f}); inside its "
                     f"noise: {', '.join(tied) or 'none'}; below it beyond the noise: {', '.join(below) or 'none'}.")
    return "\n".join(lines)


def format_table2(t2: dict) -> str:
    """AlignDistil Table 2 in miniature: reward accuracy with Wilson intervals and the paired difference."""
    few = " Fewer than 200 pairs: add held-out seeds for a tighter interval." if t2["n_pairs"] < 200 else ""
    lines = [f"{t2['n_pairs']} held-out pairs from {t2['n_prompts']} prompts ({t2['source']}).{few}", "",
             "| reward | accuracy | 95% Wilson interval |", "|---|---|---|"]
    for key, label in (("dpo", "DPO reward β0·log π_dpo/π_ref"), ("contrastive", "contrastive β0·log π_dpo/π_rev"),
                       ("reward_model", "Bradley-Terry reward model")):
        if key in t2["rewards"]:
            r = t2["rewards"][key]
            lines.append(f"| {label} | {r['accuracy']:.3f} | [{r['wilson'][0]:.3f}, {r['wilson'][1]:.3f}] |")
    d = t2.get("contrastive_minus_dpo")
    if d:
        lines += ["", f"Contrastive minus DPO accuracy, paired, bootstrap over prompts: {d['diff']:+.3f} "
                      f"[{d['lo']:+.3f}, {d['hi']:+.3f}] ({'excludes' if d['lo'] > 0 or d['hi'] < 0 else 'includes'} 0)."]
    return "\n".join(lines)


def format_table3(rows: list[dict]) -> str:
    """AlignDistil Table 3 in miniature: adaptive against constant alpha, reward and KL per strength."""
    lines = ["| teacher | strength | seeds | reward (95% CI) | KL to ref |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['strength']} | {r['n_seeds']} | {r['reward']:+.3f} ± {r['reward_ci95']:.3f} "
                     f"| {r['kl']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot
def plot_study_frontier(points: list[dict], labels: dict[str, str], path, initial: dict | None = None,
                        kl_values: Sequence[float] = (), title: str = "Reward vs KL frontier"):
    """frontier.png: per method a line through its strengths (seed means, reward 95% interval
    over prompts as error bars), each seed's point as a small marker; the initial model as a star."""
    from pathlib import Path

    from aligndistil.workflows.plots import atomic_savefig, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 5.0))
    markers = "osD^v<>ph*"
    for j, (method, row) in enumerate(frontier_table(points, []).items()):
        color, mk = f"C{j % 10}", markers[(j // 10) % len(markers)]
        xs = [s["kl"] for s in row["strengths"]]
        ax.errorbar(xs, [s["reward"] for s in row["strengths"]], yerr=[s["reward_ci95"] for s in row["strengths"]],
                    fmt="-" + mk, color=color, capsize=2, markersize=5, label=labels.get(method, method), alpha=0.9)
        own = [p for p in points if p["method"] == method]
        if row["n_seeds"] > 1:
            ax.scatter([p["kl"] for p in own], [p["reward"] for p in own], color=color, s=12, alpha=0.5, marker=mk)
    if initial is not None:
        ax.errorbar([0.0], [initial["reward"]], yerr=[initial["reward_ci95"]], fmt="*", color="k", markersize=10,
                    capsize=2, label="initial model")
    for k in kl_values:
        ax.axvline(k, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("sequence KL to the reference (nats, Monte-Carlo)")
    ax.set_ylabel("mean VADER reward (95% CI over prompts)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    try:
        return atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)
