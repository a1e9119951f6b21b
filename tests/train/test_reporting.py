"""train.report_to: metrics.jsonl always; TensorBoard and wandb (offline) through their own
packages; an unknown logger, or a known one whose package is missing, refused up front."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from aligndistil.config import ConfigError, dump_config
from aligndistil.train.loop import Trainer
from aligndistil.train.reporting import Reporter
from test_methods import make_cfg

NO_EXTRA = "the loggers extra (pip install 'aligndistil[loggers]') is not installed"


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_logged_scalar_with_its_step(tiny_ws, tmp_path):
    pytest.importorskip("tensorboard", reason=NO_EXTRA)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = ["train.report_to=[tensorboard]", "train.max_steps=3", "data.eval_split_ratio=0.25", "train.eval_steps=2"]
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", opts)).train()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "learning_rate", "grad_norm", "epoch", "rewards/chosen", "rewards/margins",
            "eval/loss", "eval/rewards/accuracies"} <= tags, tags
    logged = rows(out)
    for tag in ("loss", "rewards/margins", "eval/loss"):
        want = [(r["step"], r[tag]) for r in logged if tag in r]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # float32 in the file
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 3]  # eval_steps=2 and the last


def _wandb_records(run_file: Path) -> list:
    """The records of a wandb ``.wandb`` file: a 7-byte header, then a LevelDB-style log of
    32 KiB blocks, each record ``crc32 (4) | length (2) | type (1) | data`` with type 1 (full)
    or 2/3/4 (first/middle/last fragment); data is a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            continue
        part += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_wandb_offline_run_holds_the_metrics_and_the_config(tiny_ws, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason=NO_EXTRA)
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "tests",
                 "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                 "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(k, str(v))
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.report_to=[wandb]", "train.max_steps=2",
                                                             "data.eval_split_ratio=0.25"])).train()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    recs = _wandb_records(next(runs[0].glob("run-*.wandb")))
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    logged = rows(out)
    assert [h["_step"] for h in history] == [r["step"] for r in logged] == [1, 2]
    for h, r in zip(history, logged):
        for k in ("loss", "rewards/margins", "learning_rate"):
            assert h[k] == pytest.approx(r[k], rel=1e-12), k
    assert "eval/loss" in history[-1] and history[-1]["eval/loss"] == pytest.approx(logged[-1]["eval/loss"])
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["method"]["name"] == "dpo" and run.display_name == "o"


def test_an_unknown_logger_is_refused_by_name_before_any_work(tiny_ws, tmp_path, capsys):
    from aligndistil.cli import main

    cfg = make_cfg(tiny_ws, tmp_path / "o", "dpo")
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    capsys.readouterr()
    assert main(["train", "-c", str(path), "train.report_to=[tensorboard,neptune]"]) == 2
    err = capsys.readouterr().err
    assert "unknown logger 'neptune'" in err and "known: none, jsonl, tensorboard, wandb" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_without_its_package_names_the_extra(tiny_ws, tmp_path, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # as if not installed: find_spec gives None, import fails
    with pytest.raises(ConfigError, match=rf"includes {logger}, but the {logger} package is not installed: "
                                          r"pip install 'aligndistil\[loggers\]'") as e:
        Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", [f"train.report_to=[{logger}]"]))
    assert e.value.exit_code == 2 and not (tmp_path / "o").exists()


def test_none_and_jsonl_keep_metrics_jsonl_only_and_other_processes_write_nothing(tiny_ws, tmp_path):
    out = Trainer(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.report_to=[jsonl]"])).train()
    assert len(rows(out)) == 2 and not (out / "tensorboard").exists() and not (out / "wandb").exists()
    quiet = Reporter(tmp_path / "rank1", ["tensorboard", "wandb"], {}, active=False)
    quiet.log({"step": 1, "loss": 1.0})
    quiet.close()
    assert not (tmp_path / "rank1").exists()


def test_step_metrics_average_every_element_over_micro_batches_and_processes():
    """Two micro-batches on this process report 'kl' per token (3 values, then 1) and
    'reward' per sequence (2, then an empty tensor); another process's sums are added by
    the reduction (here: a stand-in that adds kl (sum 6, count 2) and reward (sum 0, count 0)).

    kl: (1 + 2 + 3 + 10 + 6) / (4 + 2) = 22 / 6; reward: (0.5 + 1.5) / 2 = 1.0 on this
    process alone, and unchanged by the other's empty share."""
    import torch

    from aligndistil.train.reporting import StepMetrics

    m = StepMetrics(torch.device("cpu"))
    m.add({"kl": torch.tensor([1.0, 2.0, 3.0]), "reward": torch.tensor([0.5, 1.5])})
    m.add({"kl": torch.tensor([10.0]), "reward": torch.tensor([])})
    assert m.means() == {"kl": pytest.approx(16 / 4), "reward": pytest.approx(1.0)}
    other = torch.tensor([[6.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert m.means(lambda table: table + other) == {"kl": pytest.approx(22 / 6), "reward": pytest.approx(1.0)}
    empty = StepMetrics(torch.device("cpu"))
    empty.add({"never": torch.tensor([])})
    assert empty.means() == {} and StepMetrics(torch.device("cpu")).means() == {}
