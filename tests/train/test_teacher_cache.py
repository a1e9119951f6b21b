"""The teacher cache is exact, keeps the frozen models unloaded, and refuses a stale cache."""

from __future__ import annotations

import json
import re

import pytest
import torch

from aligndistil.train.teacher_cache import TeacherCacheError
from aligndistil.train.loop import Trainer
from test_methods import make_cfg
from test_loop import assert_same_weights, losses

EXACT = ["train.optimizer=sgd", "train.learning_rate=0.5", "train.max_steps=3", "train.per_device_batch_size=4"]


@pytest.mark.parametrize("method, extra", [
    ("aligndistil", ["method.teacher=adaptive"]),
    ("aligndistil", ["method.teacher=vanilla", "method.beta=0.05"]),
    ("tdpo2", []),
    ("dpo", []),
])
def test_cached_run_equals_a_run_with_the_models_loaded(tiny_ws, tmp_path, method, extra):
    cache = tmp_path / "cache"
    plain = Trainer(make_cfg(tiny_ws, tmp_path / "loaded", method, [*extra, *EXACT])).train()
    first = Trainer(make_cfg(tiny_ws, tmp_path / "build", method, [*extra, *EXACT, f"train.teacher_cache={cache}"]))
    first.train()
    assert (cache / "manifest.json").is_file()
    second = Trainer(make_cfg(tiny_ws, tmp_path / "reuse", method, [*extra, *EXACT, f"train.teacher_cache={cache}"]))
    out = second.train()
    assert second.frozen == {}, "cached roles must not be loaded"
    for o in (first.out, out):
        assert losses(o) == pytest.approx(losses(plain), abs=1e-6)
        assert_same_weights(plain, o, atol=1e-6)


def test_adaptive_alpha_comes_from_the_cached_tvd(tiny_ws, tmp_path):
    """r and eps are not part of the cache: the TVD is stored, alpha_t = r * TVD + eps is derived."""
    cache = tmp_path / "cache"
    Trainer(make_cfg(tiny_ws, tmp_path / "a", "aligndistil", [*EXACT, f"train.teacher_cache={cache}"])).train()
    ref = Trainer(make_cfg(tiny_ws, tmp_path / "b", "aligndistil", [*EXACT, "method.r=3.0"])).train()
    out = Trainer(make_cfg(tiny_ws, tmp_path / "c", "aligndistil", [*EXACT, "method.r=3.0", f"train.teacher_cache={cache}"])).train()
    assert losses(out) == pytest.approx(losses(ref), abs=1e-6)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "tvd/mean" in rows[-1]


def test_bf16_cache_is_close(tiny_ws, tmp_path):
    ref = Trainer(make_cfg(tiny_ws, tmp_path / "a", "tdpo2", EXACT)).train()
    out = Trainer(make_cfg(tiny_ws, tmp_path / "b", "tdpo2", [*EXACT, f"train.teacher_cache={tmp_path / 'c'}",
                                                                "train.teacher_cache_dtype=bfloat16"])).train()
    assert losses(out) == pytest.approx(losses(ref), abs=1e-2)


@pytest.mark.parametrize("change, match", [
    ([], None),
    (["model.dpo_model={model}"], r"weights\.dpo_model"),
    (["data.max_length=40"], r"tokenisation\.max_length: cache has 64, this run has 40"),
    (["data.max_examples=16"], r"data: .*n_examples"),
    (["train.teacher_cache_dtype=bfloat16"], r"stored_dtype: cache has 'float32', this run has 'bfloat16'"),
    (["model.dtype=bfloat16"], r"model_dtype"),
])
def test_a_stale_cache_is_refused(tiny_ws, tmp_path, change, match):
    cache = tmp_path / "cache"
    base = [*EXACT, "train.max_steps=1", f"train.teacher_cache={cache}"]
    Trainer(make_cfg(tiny_ws, tmp_path / "a", "aligndistil", base)).train()
    built = (cache / "manifest.json").read_text()
    cfg = make_cfg(tiny_ws, tmp_path / "b", "aligndistil", [*base, *(c.format(**tiny_ws) for c in change)])
    if match is None:
        Trainer(cfg).train()  # same fingerprint: reused
    else:
        with pytest.raises(TeacherCacheError, match=r"(?s)stale.*" + match):
            Trainer(cfg).train()
    assert (cache / "manifest.json").read_text() == built, "a cache is never rewritten"


def test_changed_teacher_weights_on_disk_are_noticed(tiny_ws, tmp_path):
    """Same path, other contents: the fingerprint hashes the files, not their names."""
    import shutil
    from aligndistil.model.tiny import build_tiny_model

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_ws["model2"], teacher)
    cache = tmp_path / "cache"
    opts = [*EXACT, "train.max_steps=1", f"model.dpo_model={teacher}", f"train.teacher_cache={cache}"]
    Trainer(make_cfg(tiny_ws, tmp_path / "a", "aligndistil", opts)).train()
    build_tiny_model(teacher, seed=7)  # retrained in place
    with pytest.raises(TeacherCacheError, match=r"weights\.dpo_model"):
        Trainer(make_cfg(tiny_ws, tmp_path / "b", "aligndistil", opts)).train()


@pytest.mark.parametrize("method, extra, match", [
    ("sparsepo", [], "every layer's hidden states"),
    ("mapo", [], "activations"),
    ("kto", [], "mismatched"),
    ("sft", [], "no frozen model"),
    ("aligndistil", ["method.mode=on_policy"], "off_policy"),
])
def test_unsupported_setups_are_refused_up_front(tiny_ws, tmp_path, method, extra, match):
    with pytest.raises(TeacherCacheError, match=match):
        Trainer(make_cfg(tiny_ws, tmp_path / "x", method, [*extra, f"train.teacher_cache={tmp_path / 'c'}"]))


def test_a_folder_that_is_not_a_cache_is_refused(tiny_ws, tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match="not empty"):
        Trainer(make_cfg(tiny_ws, tmp_path / "x", "tdpo2", [*EXACT, f"train.teacher_cache={folder}"])).train()
    assert (folder / "notes.txt").read_text() == "mine"


def test_plain_loss_path_reads_the_cache_too(tiny_ws, tmp_path):
    cache = tmp_path / "cache"
    ref = Trainer(make_cfg(tiny_ws, tmp_path / "a", "aligndistil", [*EXACT, "train.loss_path=plain"])).train()
    out = Trainer(make_cfg(tiny_ws, tmp_path / "b", "aligndistil",
                           [*EXACT, "train.loss_path=plain", f"train.teacher_cache={cache}"])).train()
    assert losses(out) == pytest.approx(losses(ref), abs=1e-6)
    assert torch.is_tensor(torch.zeros(1))


def _edit_manifest(cache, change):
    m = json.loads((cache / "manifest.json").read_text())
    change(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, match", [
    (lambda c: _cut(c / "manifest.json"), r"manifest\.json is not valid JSON"),
    (lambda c: (c / "manifest.json").write_text('{"fingerprint": {}}'), r"manifest\.json has no valid 'roles'"),
    (lambda c: _cut(c / "dpo_model.response.bin", 0.9), r"dpo_model\.response\.bin has \d+ bytes, the manifest implies"),
    (lambda c: (c / "tvd.response.bin").unlink(), r"tvd\.response\.bin is missing"),
    (lambda c: _cut(c / "head.reverse_dpo_model.safetensors", 0.5), r"head\.reverse_dpo_model\.safetensors cannot be read"),
    (lambda c: (c / "head.dpo_model.safetensors").write_bytes(b"\0" * 64), r"head\.dpo_model\.safetensors cannot be read"),
    (lambda c: _edit_manifest(c, lambda m: m["streams"]["response"].pop()), r"malformed row offsets for stream 'response'"),
], ids=["manifest-cut", "manifest-keys", "rows-cut", "tvd-missing", "head-cut", "head-garbled", "offsets"])
def test_a_damaged_cache_file_is_named_with_how_to_rebuild(tiny_ws, tmp_path, capsys, damage, match):
    """A cache cut short (a killed copy, a full disk) or edited is refused before training,
    naming the file and saying how to rebuild it; exit 2; the cache is left as it was."""
    from aligndistil.cli import main
    from aligndistil.config import dump_config

    cache = tmp_path / "cache"
    base = [*EXACT, "train.max_steps=1", f"train.teacher_cache={cache}"]
    Trainer(make_cfg(tiny_ws, tmp_path / "a", "aligndistil", base)).train()  # adaptive: dpo + reverse + tvd
    damage(cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    cfg = make_cfg(tiny_ws, tmp_path / "b", "aligndistil", base)
    with pytest.raises(TeacherCacheError) as info:
        Trainer(cfg).train()
    msg = str(info.value)
    assert str(cache) in msg and f"Delete {cache} (it is rebuilt on the next run)" in msg
    assert "is damaged" in msg and re.search(match, msg), msg
    assert info.value.exit_code == 2
    assert not (tmp_path / "b" / "COMPLETE.json").exists()
    # The command line: one line, exit 2, no traceback.
    yaml_cfg = tmp_path / "b.yaml"
    yaml_cfg.write_text(dump_config(cfg))
    capsys.readouterr()
    assert main(["train", "-c", str(yaml_cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(cache) in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before, "a damaged cache is never rewritten"


def test_two_processes_build_the_same_cache_each_over_its_share(tiny_ws, tmp_path):
    """accelerate launch --num_processes 2: both processes build (disjoint halves of the
    examples, written at offsets known in advance) a cache byte-identical to the one one
    process builds, and the manifest records that two built it."""
    import sys

    from test_loop import REPO, _run, launch_args

    args = [*launch_args(tiny_ws), "train.max_steps=1", "train.per_device_batch_size=2",
            "method.name=aligndistil", "method.mode=off_policy", "train.ddp_timeout=600"]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("{}\n")
    one, two = tmp_path / "cache1", tmp_path / "cache2"
    _run([sys.executable, "-m", "aligndistil", "train", "-c", str(cfg_file), *args,
          f"train.teacher_cache={one}", f"train.output_dir={tmp_path / 'o1'}"])
    res = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"), "-m", "aligndistil", "train", "-c",
                str(cfg_file), *args, f"train.teacher_cache={two}", f"train.output_dir={tmp_path / 'o2'}"])
    assert "split over 2 process(es)" in res.stdout
    m1, m2 = (json.loads((c / "manifest.json").read_text()) for c in (one, two))
    assert (m1.pop("built_by_processes"), m2.pop("built_by_processes")) == (1, 2)
    m1.pop("built_seconds"), m2.pop("built_seconds")
    assert m1 == m2
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) and "tvd.response.bin" in files
    for name in [f for f in files if f != "manifest.json"]:  # the manifests were compared above
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not list(tmp_path.glob(".cache*"))  # no temporary folder left behind


def test_ddp_timeout_reaches_the_process_group_settings(tiny_ws, tmp_path):
    from datetime import timedelta

    from aligndistil.train.accel import make_accelerator

    acc, _ = make_accelerator(make_cfg(tiny_ws, tmp_path / "o", "dpo", ["train.ddp_timeout=123"]))
    assert acc.init_handler.timeout == timedelta(seconds=123)
