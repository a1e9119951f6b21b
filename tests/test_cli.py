"""The CLI as a user runs it: in a subprocess, with help, exit codes and clear messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "aligndistil", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def test_help_describes_every_subcommand_and_option():
    import argparse

    from aligndistil.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "pipeline", "make-tiny", "config-help"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.description or name == "config-help", f"{name} has no description"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, f"{name}: {action.option_strings or action.dest} lacks help"
    top = run("--help")
    assert top.returncode == 0 and all(n in top.stdout for n in sub.choices)
    for name in sub.choices:
        res = run(name, "--help")
        assert res.returncode == 0, res.stderr
    cfg_help = run("config-help").stdout
    for key in ("method.beta", "method.r", "train.learning_rate", "data.max_prompt_length", "model.reverse_dpo_model"):
        assert key in cfg_help


def test_train_as_a_user_would(tiny_ws, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{policy: {tiny_ws['model']}}}
data: {{train_file: {tiny_ws['prefs']}, max_length: 64, max_prompt_length: 32}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 2, per_device_batch_size: 4, learning_rate: 1.0e-3, progress_bar: false}}
method: {{name: tdpo2}}
""")
    res = run("train", "-c", str(cfg), "method.beta=0.2")
    assert res.returncode == 0, res.stderr
    assert "[done] tdpo2" in res.stdout
    # progress_bar=false silences transformers' own bars (loading, writing shards) too.
    assert "Writing model shards" not in res.stderr + res.stdout and "it/s]" not in res.stderr, res.stderr
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "beta: 0.2" in saved
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # an HF folder that from_pretrained loads


def test_errors_have_clear_messages_and_exit_codes(tiny_ws, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{policy: {tiny_ws['model']}}}\ndata: {{train_file: {tmp_path / 'bad.jsonl'}}}\n"
                   f"train: {{output_dir: {tmp_path / 'o'}, progress_bar: false}}\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    res = run("train", "-c", str(cfg))
    assert res.returncode == 2
    assert "bad.jsonl" in res.stderr and "line 2" in res.stderr

    res = run("train", "-c", str(cfg), "method.betta=1")
    assert res.returncode == 2 and "unknown key method.betta" in res.stderr

    res = run("train", "-c", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "nope.yaml" in res.stderr

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    res = run("train", "-c", str(cfg))
    assert res.returncode == 2 and "rejected" in res.stderr and "line 1" in res.stderr


def test_make_tiny_then_tiny_config(tmp_path):
    res = run("make-tiny", "--out", str(tmp_path / "tiny"))
    assert res.returncode == 0, res.stderr
    paths = json.loads(res.stdout)
    assert Path(paths["model"], "config.json").is_file() and Path(paths["prefs"]).is_file()


def test_bad_values_stop_before_any_model_loads_or_folder_is_made(tiny_ws, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "o"
    cfg.write_text(f"model: {{policy: {tiny_ws['model']}}}\ndata: {{train_file: {tiny_ws['prefs']}}}\n"
                   f"train: {{output_dir: {out}, progress_bar: false}}\n")
    for bad, says in [("model.dtype=float33", "model.dtype must be one of float32, bfloat16, float16, got 'float33'"),
                      ("model.dtype=nn", "model.dtype must be one of"),
                      ("method.beta=0", "method.beta must be > 0"),
                      ("train.save_total_limit=0", "train.save_total_limit must be >= 1"),
                      ("data.max_examples=-1", "data.max_examples must be >= 1")]:
        res = run("train", "-c", str(cfg), bad)
        assert res.returncode == 2 and f"aligndistil: config error: {says}" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr and not out.exists()
    res = run("train", "-c", str(tmp_path))
    assert res.returncode == 2 and "is a folder; give a YAML config file such as" in res.stderr
    res = run("train", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "dpo.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "run `aligndistil make-tiny --out outputs/tiny` first" in res.stderr, res.stderr


def test_output_folder_errors_exit_2_and_overwrite_lets_a_run_through(tiny_ws, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg.write_text(f"model: {{policy: {tiny_ws['model']}}}\ndata: {{train_file: {tiny_ws['prefs']}, max_length: 64, "
                   f"max_prompt_length: 32}}\ntrain: {{output_dir: {out}, max_steps: 1, progress_bar: false}}\n")
    res = run("train", "-c", str(cfg))
    assert res.returncode == 2 and "aligndistil: output folder:" in res.stderr and "--overwrite" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    res = run("train", "-c", str(cfg), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (out / "COMPLETE.json").is_file() and (out / "notes.txt").read_text() == "mine"

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run("make-tiny", "--out", str(blocker / "tiny"))
    assert res.returncode == 2 and "Not a directory" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_cut_pipes_and_help_texts():
    proc = subprocess.Popen([sys.executable, "-m", "aligndistil", "config-help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # `aligndistil config-help | head` after head has exited
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""
    res = run("eval", "--help")
    assert "95% interval" in res.stdout.replace("\n", " ") and "%%" not in res.stdout
