"""The frontier study: its rules by hand, and the whole study end to end on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from aligndistil.workflows.frontier import FrontierError, FrontierSettings, TINY, load_settings, plan, run_frontier
from aligndistil.workflows.frontier_report import (
    fixed_kl_values,
    frontier_table,
    interpolate_at,
    kl_agreement,
    paired_bootstrap_diff,
    wilson_interval,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_interpolation_at_a_fixed_kl_by_hand():
    pts = [(2.0, 0.5), (1.0, 0.2), (4.0, 0.3)]  # any order: sorted by KL
    # between (1, .2) and (2, .5): .2 + .3 * (1.5 - 1) / 1 = .35; between (2, .5) and (4, .3): .5 - .2 * 1/2 = .4
    assert interpolate_at(pts, 1.5) == pytest.approx(0.35)
    assert interpolate_at(pts, 3.0) == pytest.approx(0.40)
    assert interpolate_at(pts, 2.0) == pytest.approx(0.50) and interpolate_at(pts, 4.0) == pytest.approx(0.30)
    assert interpolate_at(pts, 0.5) is None and interpolate_at(pts, 4.5) is None  # no extrapolation


def _pt(method, i, seed, kl, reward, h=0.1):
    return {"method": method, "strength": f"s{i}", "strength_index": i, "seed": seed, "kl": kl, "kl_tokenwise": kl,
            "reward": reward, "reward_ci95": h}


def test_fixed_kl_values_and_the_table_by_hand():
    points = [_pt("a", 0, 0, 1.0, 0.2), _pt("a", 1, 0, 2.0, 0.5), _pt("a", 2, 0, 4.0, 0.3),
              _pt("b", 0, 0, 0.5, 0.1), _pt("b", 1, 0, 3.0, 0.6),
              _pt("b", 0, 1, 0.5, 0.1), _pt("b", 1, 1, 3.0, 0.4)]
    ks, (lo, hi), common = fixed_kl_values(points)
    # a spans [1, 4], b's seeds both [0.5, 3]: the common range is [1, 3]; 25/50/75% of it
    assert common and (lo, hi) == (1.0, 3.0) and ks == pytest.approx([1.5, 2.0, 2.5])
    t = frontier_table(points, ks, baseline="a")
    a, b = t["a"]["at_kl"], t["b"]["at_kl"]
    assert [e["reward"] for e in a] == pytest.approx([0.35, 0.5, 0.45])
    # b at 2.0: seed 0 .1 + .5 * 1.5/2.5 = .4, seed 1 .1 + .3 * 1.5/2.5 = .28; mean .34, range [.28, .4]
    assert b[1]["reward"] == pytest.approx(0.34) and b[1]["seed_range"] == pytest.approx([0.28, 0.40])
    assert b[1]["noise"] == pytest.approx(0.1)  # max(prompt half-width .1, half the seed range .06)
    # a - b = .16 > hypot(.1, .1) = .141: a is best and b is outside its noise; at 1.5 (.35 vs .26) it is inside
    assert a[1]["best"] and not b[1]["tied_with_best"] and b[1]["vs_baseline"]["separated"]
    assert b[0]["reward"] == pytest.approx(0.26) and b[0]["tied_with_best"]
    assert t["b"]["strengths"][1]["reward"] == pytest.approx(0.5)  # the seed mean of .6 and .4


def test_mc_and_tokenwise_kl_agreement_on_hand_made_numbers():
    # MC [1, 3]: mean 2, sd sqrt(2), half-width 1.96 * sqrt(2) / sqrt(2) = 1.96; tokenwise [1.5, 1.5]: 1.5 ± 0
    ok = kl_agreement([1.0, 3.0], [1.5, 1.5])
    assert ok["agree"] and ok["mc"] == 2.0 and ok["mc_ci95"] == pytest.approx(1.96, abs=1e-3)
    assert ok["tokenwise_ci95"] == 0.0 and ok["diff"] == pytest.approx(0.5)
    # MC [2.0, 2.2]: 2.1 ± 1.96 * 0.1414 / 1.414 = 0.196; tokenwise 1.0 ± 0: |1.1| > 0.196, a violation
    bad = kl_agreement([2.0, 2.2], [1.0, 1.0])
    assert not bad["agree"] and bad["mc_ci95"] == pytest.approx(0.196, abs=1e-3)
    with pytest.raises(ValueError):
        kl_agreement([1.0], [1.0, 2.0])


def test_reward_accuracy_interval_on_hand_worked_counts():
    # Wilson 95% for 8 of 10: centre (0.8 + 1.92/10) / 1.384 = 0.7167, half 1.96/1.384 * sqrt(.016 + .0096) = 0.2266
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 150 of 200: centre (.75 + .009604) / 1.019207 = .745290, half 1.96/1.019207 * sqrt(.0009375 + .000024) = .059631
    lo, hi = wilson_interval(150, 200)
    assert (lo, hi) == pytest.approx((0.6857, 0.8049), abs=1e-4)
    # two rewards with the same per-pair scores differ by exactly 0 in every resample
    assert paired_bootstrap_diff([1, 0, 1, 0.5], [1, 0, 1, 0.5], ["p", "p", "q", "r"], reps=50) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_bootstrap_diff([1, 1, 1, 1], [0, 0, 1, 1], ["p", "p", "q", "q"], reps=200)
    assert d == 0.5 and 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(FrontierError, match="bogus"):
        plan(FrontierSettings(only=("bogus",)))
    with pytest.raises(FrontierError, match=r"grid\['dpo'\]\[0\].*betta"):
        plan(FrontierSettings(grid={"dpo": [{"method.betta": 0.1}]}))
    cfg = tmp_path / "f.yaml"
    cfg.write_text("stepz: 3\n")
    with pytest.raises(FrontierError, match="stepz"):
        load_settings(str(cfg))
    res = subprocess.run([sys.executable, "-m", "aligndistil", "study", "frontier", "--only", "nope", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "nope" in res.stderr and not (tmp_path / "o").exists()


def test_plan_counts_runs_and_seeds():
    runs = plan(FrontierSettings())
    per = {}
    for r in runs:
        per.setdefault(r.method, set()).add((r.strength_index, r.seed))
    assert len(per) == 11 and all(len({i for i, _ in v}) >= 3 for v in per.values())
    assert len(per["dpo"]) == 6 and len(per["ipo"]) == 3  # 2 seeds for dpo, 1 for ipo
    assert len(plan(FrontierSettings(max_runs=4))) == 4


def test_the_tiny_study_runs_end_to_end_and_skips_finished_work(tmp_path):
    grid = {"dpo": [{"method.beta": 0.5}, {"method.beta": 0.05}],
            "aligndistil_off": [{"method.r": 1.0}, {"method.r": 10.0}]}
    s = FrontierSettings(**{**TINY, "out_dir": str(tmp_path / "study"), "grid": grid, "seeds": (0,)})
    logs: list[str] = []
    summary = run_frontier(s, progress=False, log=logs.append)
    out = tmp_path / "study"
    for f in ("results.md", "results.json", "frontier.png", "table2.json"):
        assert (out / f).is_file(), f
    assert len(summary["points"]) == 4 and {p["method"] for p in summary["points"]} == set(grid)
    for p in summary["points"]:
        assert p["n_prompts"] == 8 and p["samples_per_prompt"] == 1.0
        assert math.isfinite(p["reward"]) and p["kl_tokenwise"] >= 0 and "agree" in p["kl_check"]
        assert (out / "runs" / p["run"] / "COMPLETE.json").is_file()
    assert summary["initial"]["kl"] == 0.0  # the reference against itself
    assert summary["kl_check"]["n_models"] == 5
    t2 = summary["table2"]
    assert t2["n_pairs"] == 32 and set(t2["rewards"]) == {"dpo", "contrastive", "reward_model"}
    for r in t2["rewards"].values():
        assert r["wilson"][0] <= r["accuracy"] <= r["wilson"][1]
    assert [r["strength"] for r in summary["table3"]] == ["r=1.0", "r=10.0"]  # adaptive only in this grid
    md = (out / "results.md").read_text()
    assert "## Table 2 in miniature" in md and "## KL check" in md
    cfg = (out / "runs" / "dpo-beta0.05-seed0" / "config.yaml").read_text()
    assert "beta: 0.05" in cfg and "max_steps: 1" in cfg
    again: list[str] = []
    run_frontier(s, progress=False, log=again.append)
    text = "\n".join(again)
    assert text.count("complete, skipped") >= 4 + 5 + 1, text  # 4 runs, 5 evals, Table 2
    assert json.loads((out / "results.json").read_text())["points"] == json.loads(json.dumps(summary["points"]))


def test_the_pilot_config_loads_and_plans_its_grid():
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "configs" / "studies" / "frontier-pilot.yaml"
    s = load_settings(str(cfg))
    assert [r.name for r in plan(s)] == ["dpo-beta0.3-seed0", "dpo-beta0.03-seed0", "aligndistil_off-r1.0-seed0",
                                         "aligndistil_off-r3.0-seed0"]
    assert not s.table2


def test_the_real_study_trains_on_the_quickstarts_pairs(monkeypatch, tmp_path):
    """Off the tiny path: the teachers as given, the pairs made (or reused) as the quickstart makes them."""
    import aligndistil.workflows.quickstart as Q
    from aligndistil.workflows.frontier import _inputs

    seen = {}

    def fake_prefs(spec, section, out_dir, policy, progress, log):
        seen.update(section=section, out=str(out_dir), policy=policy)
        return tmp_path / "train.jsonl"

    monkeypatch.setattr(Q, "prefs", fake_prefs)
    s = FrontierSettings(out_dir=str(tmp_path), dpo_model="d", reverse_dpo_model="r")
    assert _inputs(s, False, lambda *a: None) == ("smollm2", "d", "r", tmp_path / "train.jsonl")
    assert seen == {"section": "prefs", "out": "outputs/quickstart", "policy": "smollm2"}
