"""The shipped quickstart files parse and resolve; the quickstart runs end to end (slow)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aligndistil.config import ConfigError
from aligndistil.workflows.pipeline import load_pipeline
from aligndistil.workflows.quickstart import default_config, load_quickstart, run_quickstart, write_pipeline

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "pipelines" / "quickstart.yaml"
FULL = REPO / "configs" / "pipelines" / "full.yaml"


@pytest.mark.parametrize("path", [QUICKSTART, FULL], ids=["quickstart", "full"])
def test_shipped_files_resolve(path, tmp_path):
    spec, stage_overrides = load_quickstart(path, ["train.progress_bar=false"])
    assert spec["base"]["model"]["policy"] == "smollm2"
    pipe = write_pipeline(spec, tmp_path / "pairs.jsonl", tmp_path / "pipeline.yaml")
    stages = load_pipeline(pipe, stage_overrides)
    names = [s.name for s in stages]
    assert names[:2] == ["dpo", "reverse_dpo"]
    for st in stages:
        assert st.cfg.data.train_file == str(tmp_path / "pairs.jsonl")
        assert st.cfg.train.progress_bar is False
        if st.cfg.method.name == "aligndistil":
            assert st.cfg.model.dpo_model.endswith("/dpo") and st.cfg.model.reverse_dpo_model.endswith("/reverse_dpo")
            assert set(st.upstream) == {"dpo", "reverse_dpo"}
    assert set(spec["eval"]["models"]) - {"initial"} <= set(names)
    methods = {(s.cfg.method.name, s.cfg.method.mode if s.cfg.method.name == "aligndistil" else "") for s in stages}
    assert {("dpo", ""), ("tdpo2", ""), ("aligndistil", "off_policy"), ("aligndistil", "on_policy")} <= methods


def test_default_config_is_the_quickstart():
    assert default_config().resolve() == QUICKSTART.resolve()


def test_overrides_and_bad_keys(tmp_path):
    spec, rest = load_quickstart(QUICKSTART, ["prefs.max_prompts=7", "eval.seed=9", "reward=mod:fn",
                                              "train.max_steps=2"], model="some/model", output_dir=str(tmp_path))
    assert spec["prefs"]["max_prompts"] == 7 and spec["eval"]["seed"] == 9 and spec["reward"] == "mod:fn"
    assert spec["base"]["model"]["policy"] == "some/model" and spec["output_dir"] == str(tmp_path)
    assert rest == ["train.max_steps=2"]
    with pytest.raises(ConfigError, match="unknown keys in prefs"):
        load_quickstart(QUICKSTART, ["prefs.bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("models: [initial, dpo,", "models: [initial, nosuchstage, dpo,"))
    with pytest.raises(ConfigError, match="nosuchstage"):
        load_quickstart(bad)
    bad.write_text(QUICKSTART.read_text() + "\nextra_section: 1\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'extra_section'"):
        load_quickstart(bad)


@pytest.mark.slow
def test_quickstart_end_to_end_on_the_tiny_model(tiny_ws, tmp_path, monkeypatch, capsys):
    """The real quickstart file at minimal sizes on the tiny random model (a reward it can move:
    vowel count), through the CLI; then a rerun skips every finished step."""
    from aligndistil.cli import main

    (tmp_path / "qs_reward.py").write_text(textwrap.dedent("""
        def vowels(prompts, responses):
            return [float(sum(c in "aeiou" for c in r)) for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("qs_reward", None)
    out = tmp_path / "qs"
    args = ["quickstart", "--model", tiny_ws["model"], "--out", str(out), "--no-progress",
            "reward=qs_reward:vowels", "prefs.max_prompts=24", "prefs.max_new_tokens=8", "prefs.tie_threshold=1",
            "heldout.max_prompts=12", "heldout.max_new_tokens=8", "heldout.tie_threshold=1",
            "eval.max_new_tokens=8", "train.max_steps=2", "train.progress_bar=false", "train.learning_rate=1e-3",
            "method.max_new_tokens=8"]
    start = time.time()
    assert main(args) == 0
    first = time.time() - start
    printed = capsys.readouterr().out
    for name in ("initial", "dpo", "tdpo2", "aligndistil_off_policy", "aligndistil_on_policy"):
        assert f"| {name} |" in printed
    assert "Reward accuracy on" in printed
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["models"]["initial"]["kl_ref"] == 0.0
    assert res["settings"]["n_prompts"] == 84  # every test prompt: evaluation is never cut short
    assert set(res["plots"]["training_curve_runs"]) == {"dpo", "reverse_dpo", "aligndistil_off_policy",
                                                         "aligndistil_on_policy", "tdpo2"}
    for png in ("frontier.png", "training_curves.png"):
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("dpo", "reverse_dpo", "aligndistil_off_policy", "aligndistil_on_policy", "tdpo2"):
        assert (out / stage / "COMPLETE.json").is_file()
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["timings_s"]) >= {"prefs", "heldout_prefs", "train", "eval", "total"}
    assert first < 60, f"the tiny quickstart took {first:.0f} s"

    import re

    skip = re.compile(r"complete.*, skipped$", re.M)
    assert not skip.findall(printed)
    assert main(args) == 0  # a rerun: pairs and stages are skipped, only evaluation runs again
    assert len(skip.findall(capsys.readouterr().out)) == 7  # 2 pair files + 5 stages
