"""Fault injection on a run's output folder: what is there afterwards is never a lie.

Each test damages, races or cuts short a run of the tiny model and checks two things: the
error (if any) is a clear :class:`~aligndistil.errors.AlignDistilError` with exit code 2
(130 for Ctrl-C), and nothing that was there before is lost: a finished run keeps its
``COMPLETE.json`` and weights, earlier checkpoints keep passing their manifest check, and
no temporary folder is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aligndistil.config import load_config
from aligndistil.errors import EXIT_USAGE
from aligndistil.train import checkpoints as CK
from aligndistil.train import run_folder as RF
from aligndistil.train.checkpoints import CheckpointError, OutputFolderError
from aligndistil.train.loop import Interrupted, Trainer
from test_loop import assert_same_weights, losses
from test_methods import make_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(folder: Path) -> dict:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def finished(tiny_ws, tmp_path):
    """A finished DPO run with its checkpoints kept, on a copy of the data: (overrides, folder, data)."""
    data = tmp_path / "prefs.jsonl"
    shutil.copy(tiny_ws["prefs"], data)
    opts = ["train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5", f"data.train_file={data}"]
    out = Trainer(make_cfg(tiny_ws, tmp_path / "run", "dpo", opts)).train()
    assert (out / "COMPLETE.json").is_file() and [s for s, _ in CK.numbered_checkpoints(out)] == [1, 2]
    return opts, out, data


# ----------------------------------------------------------------------------- issue item 1
def test_a_failed_rerun_or_resume_keeps_a_finished_run(tiny_ws, finished):
    opts, out, data = finished
    before = snapshot(out)
    # --resume with another config: refused, naming the checkpoint; nothing changes.
    with pytest.raises(CheckpointError, match="checkpoint-2 was made with a different config") as e:
        Trainer(make_cfg(tiny_ws, out, "dpo", [*opts, "method.beta=0.3"]), resume=True).train()
    assert e.value.exit_code == EXIT_USAGE and snapshot(out) == before

    # --resume of the finished run itself, with a stray checkpoint-7x and a damaged
    # checkpoint lying around: nothing to do, nothing touched.
    (out / "checkpoint-7x").mkdir()
    (out / "checkpoint-2" / CK.TRAINER_STATE).write_bytes(b"broken")
    before = snapshot(out)
    Trainer(make_cfg(tiny_ws, out, "dpo", opts), resume=True).train()
    assert snapshot(out) == before and (out / "checkpoint-7x").is_dir()

    # A fresh rerun of the same config whose data file went bad: the data error comes
    # before the folder is marked as a run in progress.
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    with pytest.raises(Exception, match=r"prefs\.jsonl.*line 2") as e:
        Trainer(make_cfg(tiny_ws, out, "dpo", opts)).train()
    assert getattr(e.value, "exit_code", None) == EXIT_USAGE
    assert snapshot(out) == before and no_leftovers(out)


def test_a_fresh_run_refuses_a_folder_that_is_not_its_own(tiny_ws, tmp_path, finished):
    opts, out, _ = finished
    before = snapshot(out)
    with pytest.raises(OutputFolderError, match=r"(?s)not empty.*finished run of another config.*--overwrite") as e:
        Trainer(make_cfg(tiny_ws, out, "dpo", [*opts, "method.beta=0.3"])).train()
    assert e.value.exit_code == EXIT_USAGE and snapshot(out) == before

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    with pytest.raises(OutputFolderError, match=r"1 other entries \(notes\.txt\)"):
        Trainer(make_cfg(tiny_ws, other, "dpo")).train()
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # Allowed: this config's own finished run (it trains again), and anything with overwrite.
    Trainer(make_cfg(tiny_ws, out, "dpo", opts)).train()
    Trainer(make_cfg(tiny_ws, other, "dpo", ["train.overwrite_output_dir=true"])).train()
    assert (other / "notes.txt").read_text() == "my notes" and (other / "COMPLETE.json").is_file()


# ----------------------------------------------------------------------------- issue item 2
def test_a_second_writer_is_refused_while_the_first_runs(tiny_ws, tmp_path):
    out = tmp_path / "shared"
    first = Trainer(make_cfg(tiny_ws, out, "dpo", ["train.max_steps=3"]))
    real, seen = first.train_step, {}

    def step(i):
        if i == 1:  # the first run is mid-way: a second one starts on the same folder
            with pytest.raises(OutputFolderError, match=r"in use by another run \(pid \d+ on") as e:
                Trainer(make_cfg(tiny_ws, out, "dpo", ["train.max_steps=3"])).train()
            seen["code"] = e.value.exit_code
        return real(i)

    first.train_step = step
    first.train()
    assert seen["code"] == EXIT_USAGE
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / RF.LOCK).exists()


def test_a_lock_left_by_a_dead_run_is_taken_over_and_another_hosts_is_not(tiny_ws, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / RF.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    logs = []
    trainer = Trainer(make_cfg(tiny_ws, out, "dpo"))
    trainer._log = logs.append
    trainer.train()
    assert any("no longer running" in line for line in logs) and not (out / RF.LOCK).exists()

    (out / RF.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(OutputFolderError, match=f"pid 1 on elsewhere.*delete {re.escape(str(out / RF.LOCK))}"):
        Trainer(make_cfg(tiny_ws, out, "dpo")).train()
    assert (out / "COMPLETE.json").is_file()


# ----------------------------------------------------------------------------- issue item 3
def test_rotation_deletes_only_this_runs_numbered_checkpoints(tiny_ws, tmp_path):
    out = tmp_path / "o"
    foreign = Trainer(make_cfg(tiny_ws, out, "dpo", ["train.max_steps=7", "train.save_steps=3",
                                                     "train.save_total_limit=9"])).train()
    (foreign / "COMPLETE.json").unlink()  # an unfinished run of another config
    theirs = {n: snapshot(out / n) for n in ("checkpoint-3", "checkpoint-6")}
    (out / "checkpoint-7x").mkdir()
    Trainer(make_cfg(tiny_ws, out, "dpo", ["train.max_steps=3", "train.save_steps=1", "train.save_total_limit=1",
                                           "train.overwrite_output_dir=true"])).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6",
                                                               "checkpoint-7x"]
    assert {n: snapshot(out / n) for n in theirs} == theirs


def test_resume_ignores_unnumbered_folders(tiny_ws, tmp_path):
    opts = ["train.max_steps=3", "train.save_steps=1"]
    full = Trainer(make_cfg(tiny_ws, tmp_path / "full", "dpo", opts)).train()
    died = tmp_path / "died"
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-7x")
    Trainer(make_cfg(tiny_ws, died, "dpo", opts), resume=True).train()
    assert_same_weights(full, died)


# ----------------------------------------------------------------------------- issue item 4
def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _overwrite_100_bytes(p: Path):
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 100] = bytes(100)
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, says", [
    ("model/model.safetensors", _truncate, r"model/model\.safetensors has \d+ bytes but the manifest says \d+"),
    ("trainer_state.pt", _truncate, r"trainer_state\.pt has \d+ bytes"),
    ("model/model.safetensors", _overwrite_100_bytes, r"model/model\.safetensors differs from its manifest"),
], ids=["truncated-weights", "truncated-state", "overwritten-weights"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tiny_ws, tmp_path, name, damage, says):
    opts = ["train.max_steps=4", "train.save_steps=1", "train.save_total_limit=3"]
    full = Trainer(make_cfg(tiny_ws, tmp_path / "full", "dpo", opts)).train()
    died = tmp_path / "died"
    died.mkdir()
    for n in ("checkpoint-2", "checkpoint-3"):
        shutil.copytree(full / n, died / n)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (died / "metrics.jsonl").write_text("".join(x + "\n" for x in lines[:3]))
    damage(died / "checkpoint-3" / name)
    logs = []
    trainer = Trainer(make_cfg(tiny_ws, died, "dpo", opts), resume=True)
    trainer._log = logs.append
    trainer.train()
    assert any("skipping checkpoint-3: " in line and re.search(says, line) for line in logs), logs
    assert_same_weights(full, died)  # resumed from checkpoint-2: still the uninterrupted run
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)


def test_no_good_checkpoint_is_a_clear_error_that_changes_nothing(tiny_ws, tmp_path):
    opts = ["train.max_steps=3", "train.save_steps=1"]
    full = Trainer(make_cfg(tiny_ws, tmp_path / "full", "dpo", opts)).train()
    died = tmp_path / "died"
    died.mkdir()
    for n in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(full / n, died / n)
        _truncate(died / n / "model" / "model.safetensors")
    before = snapshot(died)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*checkpoint-2: .*; checkpoint-1: ") as e:
        Trainer(make_cfg(tiny_ws, died, "dpo", opts), resume=True).train()
    assert e.value.exit_code == EXIT_USAGE and snapshot(died) == before
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer(make_cfg(tiny_ws, tmp_path / "empty", "dpo", opts), resume=True).train()
    assert not (tmp_path / "empty").exists()  # a run that failed its checks leaves no folder


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    from aligndistil.train import checkpoints as CK
    from aligndistil.cli import main

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk raises; it sends no signal
    where, limit = sys.argv[1], int(sys.argv[2])
    real = getattr(CK, where)
    calls = []

    def limited(*a, **k):
        calls.append(1)
        if where == "save_final" or len(calls) == 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return real(*a, **k)

    setattr(CK, where, limited)
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("where, says", [("save_checkpoint", "could not write checkpoint-2"),
                                         ("save_final", "could not write the model")])
def test_a_full_disk_is_a_clean_error_and_keeps_earlier_checkpoints(tiny_ws, tmp_path, where, says):
    out = tmp_path / "o"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    args = ["train", "-c", str(cfg), f"model.policy={tiny_ws['model']}", f"data.train_file={tiny_ws['prefs']}",
            "data.max_length=64", "data.max_prompt_length=32", f"train.output_dir={out}", "train.max_steps=3",
            "train.save_steps=1", "train.per_device_batch_size=4", "train.progress_bar=false", "method.name=dpo"]
    res = subprocess.run([sys.executable, "-c", DISK_FULL, where, "20000", *args], capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert res.returncode == EXIT_USAGE, res.stderr[-3000:]
    assert f"aligndistil: output folder: {says}" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "File too large" in res.stderr
    assert no_leftovers(out) and not (out / "COMPLETE.json").exists()
    good = [p for _, p in CK.numbered_checkpoints(out)]
    assert [p.name for p in good] == (["checkpoint-1"] if where == "save_checkpoint" else ["checkpoint-1", "checkpoint-2"])
    assert all(CK.checkpoint_problem(p) is None for p in good)
    # Space freed: the run resumes from what the full disk left.
    Trainer(load_config(out / "config.yaml"), resume=True).train()
    assert (out / "COMPLETE.json").is_file()


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_names_the_last_checkpoint(tiny_ws, tmp_path):
    cfg = make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.max_steps=4", "train.save_steps=2"])
    trainer = Trainer(cfg)
    real = trainer.train_step

    def step(i):
        if i == 2:
            raise KeyboardInterrupt
        return real(i)

    trainer.train_step = step
    with pytest.raises(Interrupted, match=r"during step 3 of 4; last checkpoint: .*checkpoint-2 \(continue from it "
                                          r"with --resume\)") as e:
        trainer.train()
    assert e.value.exit_code == 130
    out = tmp_path / "o"
    assert no_leftovers(out) and CK.checkpoint_problem(out / "checkpoint-2") is None


def test_sigint_to_a_cli_run_exits_130_with_one_line(tiny_ws, tmp_path):
    out = tmp_path / "o"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aligndistil", "train", "-c", str(cfg), f"model.policy={tiny_ws['model']}",
         f"data.train_file={tiny_ws['prefs']}", "data.max_length=64", "data.max_prompt_length=32",
         f"train.output_dir={out}", "train.max_steps=400", "train.save_steps=1", "train.progress_bar=false",
         "method.name=dpo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (out / "checkpoint-1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "aligndistil: interrupted: stopped by Ctrl-C during step" in err, err[-3000:]
    assert "(continue from it with --resume)" in err
    assert no_leftovers(out)
    assert all(CK.checkpoint_problem(p) is None for _, p in CK.numbered_checkpoints(out))


# ----------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_bad_middle_one_named(tiny_ws, tmp_path):
    opts = ["train.max_steps=3", "train.save_steps=2"]
    full = Trainer(make_cfg(tiny_ws, tmp_path / "full", "dpo", opts)).train()
    died = tmp_path / "died"
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (died / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:17])  # killed mid-append
    Trainer(make_cfg(tiny_ws, died, "dpo", opts), resume=True).train()
    assert losses(died) == pytest.approx(losses(full), abs=1e-6)

    shutil.rmtree(died)
    died.mkdir()
    shutil.copytree(full / "checkpoint-2", died / "checkpoint-2")
    (died / "metrics.jsonl").write_text("{oops\n" + lines[1] + "\n")
    with pytest.raises(OutputFolderError, match=r"metrics\.jsonl: line 1 is not a metrics record"):
        Trainer(make_cfg(tiny_ws, died, "dpo", opts), resume=True).train()


# ----------------------------------------------------------------------------- unwritable folders
def test_an_unwritable_output_folder_is_a_clear_error(tiny_ws, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputFolderError, match=f"cannot create the output folder {re.escape(str(blocker / 'o'))}: Not a dir"):
        Trainer(make_cfg(tiny_ws, blocker / "o", "dpo")).train()

    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def denied(path, *a, **k):  # what a read-only folder answers (root ignores chmod, so simulate it)
        if str(path).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(RF.os, "open", denied)
    with pytest.raises(OutputFolderError, match=f"cannot write to the output folder {re.escape(str(ro))}: Permission denied"):
        Trainer(make_cfg(tiny_ws, ro, "dpo")).train()
    assert list(ro.iterdir()) == []


# ----------------------------------------------------------------------------- RNG of every process
def test_rng_states_of_every_process_and_the_cuda_device_are_saved_and_restored(monkeypatch):
    import random

    import torch

    fake_cuda = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: fake_cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: fake_cuda.update(state=s.clone()))
    torch.manual_seed(1)
    rank0 = CK.rng_state()
    torch.manual_seed(2)
    random.seed(2)
    fake_cuda["state"] = torch.tensor([9, 9], dtype=torch.uint8)
    rank1 = CK.rng_state()
    expected = torch.rand(3)
    saved = {"ranks": [rank0, rank1]}

    fake_cuda["state"] = torch.tensor([0], dtype=torch.uint8)
    assert CK.restore_rng(saved, rank=1, world_size=2)
    assert torch.equal(torch.rand(3), expected)  # rank 1 continues its own stream, not rank 0's
    assert fake_cuda["state"].tolist() == [9, 9]
    assert not CK.restore_rng(saved, rank=0, world_size=3)  # written by 2 processes: not exact for 3
    assert CK.restore_rng(rank0, rank=0, world_size=1)  # a checkpoint from before per-process states
    assert fake_cuda["state"].tolist() == [1, 2, 3]
