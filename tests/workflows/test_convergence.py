"""The convergence study (AlignDistil Fig. 2) end to end on the tiny model, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aligndistil.workflows.convergence import METHODS, REFERENCE, summarise

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def study(out, *extra):
    return subprocess.run([sys.executable, "-m", "aligndistil", "study", "convergence", "--tiny", "--out", str(out),
                           "--no-progress", *extra], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow
def test_the_tiny_study_runs_end_to_end_and_skips_finished_runs(tmp_path):
    out = tmp_path / "study"
    res = study(out, "--steps", "3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for f in ("results.md", "results.json", "convergence.png", "vader.png", "prompts.jsonl"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["methods"]) == set(METHODS) and summary["settings"]["seeds"] == [0, 1]
    for row in summary["methods"].values():
        assert row["steps"] == 3 and len(row["final_per_seed"]) == 2 and row["final_vader"] is not None
    for method in METHODS:
        for seed in (0, 1):
            run = out / "runs" / f"{method}-seed{seed}"
            cfg = (run / "config.yaml").read_text()
            assert "beta: 0.08" in cfg and f"seed: {seed}" in cfg and (run / "COMPLETE.json").is_file()
    # AlignDistil's static alpha is the contrastive teacher's beta0 / beta.
    assert "alpha: 1.25" in (out / "runs" / "aligndistil-seed0" / "config.yaml").read_text()
    again = study(out, "--steps", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete, skipped") == 2 * len(METHODS), again.stdout  # every run
    assert "[pipeline] dpo: complete in" in again.stdout and "[pipeline] reverse_dpo: complete in" in again.stdout


def test_steps_to_reach_and_the_speed_up_by_hand(tmp_path):
    """Curves chosen so that each number of the table can be checked by hand (smooth = 1)."""
    curves = {"aligndistil": [[0.1, 0.3, 0.5, 0.6]], REFERENCE: [[0.0, 0.1, 0.2, 0.3]],
              "reinforce_sequence": [[0.0, 0.0, 0.1, 0.1]]}
    runs = {}
    for method, per_seed in curves.items():
        runs[method] = []
        for k, c in enumerate(per_seed):
            folder = tmp_path / f"{method}-{k}"
            folder.mkdir()
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"step": i + 1, "reward/contrastive_per_token": v, "rollout/reward": 0.0}) + "\n"
                for i, v in enumerate(c)))
            runs[method].append(folder)
    s = summarise(runs, smooth=1)
    # token REINFORCE ends at 0.3 and gets there at step 4; AlignDistil passes 0.3 at step 2 (2x faster);
    # sentence-level REINFORCE never does within its 4 steps.
    assert s["target"] == pytest.approx(0.3)
    m = s["methods"]
    assert (m[REFERENCE]["steps_to_target"], m["aligndistil"]["steps_to_target"]) == (4, 2)
    assert m["aligndistil"]["x_faster"] == pytest.approx(2.0) and m[REFERENCE]["x_faster"] == pytest.approx(1.0)
    assert m["reinforce_sequence"]["steps_to_target"] is None and m["reinforce_sequence"]["x_faster"] is None
    # Trailing means over 2 steps: token REINFORCE (0, .05, .15, .25) ends at 0.25, reached at step 4;
    # AlignDistil (.1, .2, .4, .55) first passes 0.25 at step 3: 4/3 times faster.
    s2 = summarise(runs, smooth=2)
    assert s2["target"] == pytest.approx(0.25) and s2["methods"]["aligndistil"]["steps_to_target"] == 3
    assert s2["methods"]["aligndistil"]["x_faster"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("make, args, says", [
    (lambda d: "", [], "holds no prompts"),
    (lambda d: "one\ntwo\nthree\n", ["--batch-size", "4"], "3 prompts (of at most --max-prompts 8) are fewer than "
                                                            "one batch of --batch-size 4"),
    (lambda d: "one\ntwo\n", ["--batch-size", "2", "--steps", "0"], "--steps must be a positive whole number"),
    (lambda d: "one\ntwo\n", ["--batch-size", "2", "train.no_such_key=1"], "no_such_key"),
])
def test_bad_study_settings_stop_with_exit_2_before_anything_is_written(tmp_path, make, args, says):
    """An empty prompt set, fewer prompts than a batch, a bad count or a bad run override: each
    named, exit code 2, before any model loads and before the output folder exists."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(make(tmp_path))
    out = tmp_path / "study"
    res = subprocess.run([sys.executable, "-m", "aligndistil", "study", "convergence", "--prompts", str(prompts),
                          "--out", str(out), "--no-progress", "--max-prompts", "8", *args],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    assert says in res.stderr, res.stderr[-2000:]
    assert not out.exists()
