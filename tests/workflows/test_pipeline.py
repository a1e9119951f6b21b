"""The DPO -> reverse DPO -> AlignDistil pipeline end to end, its resume-by-skipping, and the user's
route (issue 16): --out, stage config lookup, checks before any stage, the dry run, per-stage
overrides, overrides a method does not use, the half-precision warning."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from aligndistil.cli import main
from aligndistil.config import ConfigError, MethodConfig
from aligndistil.train.methods import METHOD_NAMES, MODES, TEACHERS, get_method
from aligndistil.workflows.pipeline import load_pipeline, precision_warnings, run_pipeline
from aligndistil.workflows.pipeline_plan import plan

REPO = Path(__file__).resolve().parents[2]


def write_pipeline(tmp_path, ws) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(f"""
output_dir: {tmp_path / 'out'}
base:
  model: {{policy: {ws['model']}}}
  data: {{train_file: {ws['prefs']}, max_length: 64, max_prompt_length: 32}}
  train: {{learning_rate: 1.0e-2, warmup_ratio: 0.0, per_device_batch_size: 4, max_steps: 2, progress_bar: false}}
stages:
  - name: dpo
    overrides: {{method: {{name: dpo}}}}
  - name: reverse_dpo
    overrides: {{method: {{name: dpo, reverse: true}}}}
  - name: distil
    overrides:
      model: {{dpo_model: "stage:dpo", reverse_dpo_model: "stage:reverse_dpo"}}
      method: {{name: aligndistil, mode: off_policy, teacher: adaptive, r: 10.0}}
""")
    return p


def test_pipeline_runs_then_resumes_only_what_is_missing(tiny_ws, tmp_path):
    pipe = write_pipeline(tmp_path, tiny_ws)
    logs: list[str] = []
    outs = run_pipeline(pipe, log=logs.append)
    assert [o.name for o in outs] == ["dpo", "reverse_dpo", "distil"]
    assert all((o / "COMPLETE.json").is_file() and (o / "model.safetensors").is_file() for o in outs)
    # The distillation stage was given the two earlier stages' folders as teachers.
    cfg_text = (outs[2] / "config.yaml").read_text()
    assert str(outs[0]) in cfg_text and str(outs[1]) in cfg_text
    assert sum("training" in line for line in logs) == 3

    # Nothing to do on a second run.
    logs.clear()
    run_pipeline(pipe, log=logs.append)
    assert sum("skipped" in line for line in logs) == 3

    # Delete the last stage: only it reruns.
    shutil.rmtree(outs[2])
    logs.clear()
    run_pipeline(pipe, log=logs.append)
    assert [line.split(":")[0] for line in logs if "training" in line] == ["[pipeline] distil"]
    assert sum("skipped" in line for line in logs) == 2

    # A changed hyper-parameter in the reverse stage reruns it and the stage that reads it.
    logs.clear()
    pipe.write_text(pipe.read_text().replace("reverse: true}", "reverse: true, beta: 0.2}"))
    run_pipeline(pipe, log=logs.append)
    assert [line.split(":")[0] for line in logs if "training" in line] == ["[pipeline] reverse_dpo", "[pipeline] distil"]


def test_stage_reference_must_be_earlier(tiny_ws, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("""
stages:
  - name: distil
    overrides: {model: {dpo_model: "stage:dpo"}, method: {name: aligndistil}}
  - name: dpo
""")
    with pytest.raises(ConfigError, match=r"stages\[0\].*stage:dpo.*EARLIER"):
        load_pipeline(p)


@pytest.mark.parametrize("text, match", [
    ("stages: []\n", "non-empty"),
    ("stages:\n  - name: a\n  - name: a\n", "duplicate stage name"),
    ("stages:\n  - name: a\n    overide: {}\n", "unknown keys"),
    ("outputdir: x\nstages:\n  - name: a\n", "unknown top-level key"),
    ("stages:\n  - name: a\n    overrides: {method: {betta: 1}}\n", r"stages\[0\].*method\.betta"),
])
def test_bad_pipeline_files(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_pipeline(p)


# --------------------------------------------------------------------------- issue 16, item 1: --out
def test_out_moves_every_stage_and_the_references_that_read_them(tiny_ws, tmp_path):
    pipe = write_pipeline(tmp_path, tiny_ws)
    outs = run_pipeline(pipe, out=tmp_path / "mine", log=lambda s: None)
    assert outs == [tmp_path / "mine" / n for n in ("dpo", "reverse_dpo", "distil")]
    # The distillation stage read ITS teachers (the --out ones), not the file's output_dir.
    saved = yaml.safe_load((outs[2] / "config.yaml").read_text())
    assert saved["model"]["dpo_model"] == str(tmp_path / "mine" / "dpo")
    assert saved["model"]["reverse_dpo_model"] == str(tmp_path / "mine" / "reverse_dpo")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["train.output_dir=outputs/mine", "distil:train.output_dir=x", "output_dir=x"])
def test_output_dir_override_is_refused_pointing_at_out(tiny_ws, tmp_path, override):
    pipe = write_pipeline(tmp_path, tiny_ws)
    with pytest.raises(ConfigError, match="--out DIR"):
        run_pipeline(pipe, [override])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, match", [
    ("base: {train: {output_dir: x}}\nstages:\n  - name: a\n", "bad.yaml: base: train.output_dir.*--out"),
    ("stages:\n  - name: a\n    overrides: {train: {output_dir: x}}\n", r"stages\[0\] 'a' overrides: train.output_dir.*--out"),
])
def test_output_dir_in_the_file_is_refused(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_pipeline(p)


def test_stage_config_is_found_next_to_the_file_then_in_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the source checkout's is the fallback
    copy = tmp_path / "elsewhere" / "paper.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "configs" / "pipelines" / "paper.yaml", copy)
    stages = load_pipeline(copy, out=tmp_path / "o")
    assert [Path(s.config_file) for s in stages] == [REPO / "configs" / f"{s.name}.yaml" for s in stages]
    assert stages[2].cfg.model.dpo_model == str(tmp_path / "o" / "dpo")
    # A file of that name next to the pipeline file wins.
    (copy.parent / "dpo.yaml").write_text("method: {name: dpo, beta: 0.3}\n")
    stages = load_pipeline(copy)
    assert stages[0].config_file == str(copy.parent / "dpo.yaml") and stages[0].cfg.method.beta == 0.3
    assert stages[0].cfg.model.policy == "Qwen/Qwen2.5-1.5B-Instruct"  # the file's base still applies
    copy.write_text(copy.read_text().replace("config: reverse_dpo.yaml", "config: nosuch.yaml"))
    with pytest.raises(ConfigError, match=r"stages\[1\] 'reverse_dpo': config file 'nosuch.yaml' not found "
                                          r"\(looked at: .*elsewhere/nosuch.yaml, .*configs/nosuch.yaml"):
        load_pipeline(copy)


def test_every_stage_is_checked_before_any_runs(tiny_ws, tmp_path):
    pipe = write_pipeline(tmp_path, tiny_ws)
    text = pipe.read_text().replace("reverse: true}", "reverse: true, beta: 0}")
    pipe.write_text(text + "  - name: more\n    config: missing.yaml\n")
    with pytest.raises(ConfigError) as e:
        run_pipeline(pipe)
    # Both bad stages are named, each with what is wrong; the good first stage did not run.
    msg = str(e.value)
    assert "stages[1] 'reverse_dpo': method.beta must be > 0" in msg
    assert "stages[3] 'more': config file 'missing.yaml' not found" in msg
    assert not (tmp_path / "out").exists()
    # Missing inputs of any stage are refused up front too, naming the stage.
    with pytest.raises(ConfigError, match="stage 'dpo': data.train_file: .*nosuch.jsonl does not exist"):
        run_pipeline(write_pipeline(tmp_path, tiny_ws), ["data.train_file=" + str(tmp_path / "nosuch.jsonl")])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- items 2 and 3: dry run, per-stage overrides
def test_dry_run_resolves_what_a_run_does_and_unused_overrides_keep_the_teachers(tiny_ws, tmp_path, capsys):
    pipe = write_pipeline(tmp_path, tiny_ws)
    assert [s["status"] for s in plan(pipe)["stages"]] == ["run", "run", "run"]
    run_pipeline(pipe, log=lambda s: None)
    assert [s["status"] for s in plan(pipe)["stages"]] == ["skip", "skip", "skip"]
    # An override a run would apply changes the plan as it would change the run.
    assert [s["status"] for s in plan(pipe, ["train.max_steps=3"])["stages"]] == ["retrain"] * 3
    # method.r: only the distillation stage uses it; the teachers are kept (and the dry run says so).
    p = plan(pipe, ["method.r=12", "method.max_new_tokens=5"])
    assert [s["status"] for s in p["stages"]] == ["skip", "skip", "retrain"]
    assert p["stages"][0]["dropped"] == ["method.r=12", "method.max_new_tokens=5"]
    assert p["stages"][2]["dropped"] == ["method.max_new_tokens=5"]  # off-policy: no sampling
    assert p["stages"][2]["config"]["method.r"] == 12.0 and "method.max_new_tokens" not in p["stages"][2]["config"]
    logs: list[str] = []
    run_pipeline(pipe, ["method.r=12", "method.max_new_tokens=5"], log=logs.append)
    assert [line.split(":")[0] for line in logs if "training" in line] == ["[pipeline] distil"]
    saved = yaml.safe_load((tmp_path / "out" / "dpo" / "config.yaml").read_text())
    assert saved["method"]["max_new_tokens"] == 64 and saved["method"]["r"] == 10.0  # the defaults: not landed

    # The command line: text per stage, and an unknown key refused with exit 2, naming it.
    assert main(["pipeline", "-c", str(pipe), "--dry-run", "method.r=12", "method.max_new_tokens=5"]) == 0
    out = capsys.readouterr().out
    assert "[dpo] method dpo" in out and "skip: complete with the same fingerprint" in out
    assert "dropped:     method.r=12 method.max_new_tokens=5 (method dpo does not use these keys" in out
    assert f"output:      {tmp_path / 'out' / 'distil'}" in out and "    method.r: 12.0" in out
    assert main(["pipeline", "-c", str(pipe), "--dry-run", "bogus.key=1"]) == 2
    assert "bogus.key=1" in capsys.readouterr().err
    assert main(["pipeline", "-c", str(pipe), "--dry-run", "--json", "--out", str(tmp_path / "x")]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["output_dir"] == str(tmp_path / "x" / "dpo")


def test_per_stage_overrides(tiny_ws, tmp_path):
    pipe = write_pipeline(tmp_path, tiny_ws)
    plain = {s.name: s for s in load_pipeline(pipe)}
    staged = {s.name: s for s in load_pipeline(pipe, ["method.beta=0.3", "distil:method.r=12", "dpo:method.beta=0.2"])}
    assert staged["dpo"].cfg.method.beta == 0.2  # the stage's own override comes after the global one
    assert staged["reverse_dpo"].cfg.method.beta == 0.3
    assert staged["distil"].cfg.method.r == 12.0 and plain["distil"].cfg.method.r == 10.0
    # The adaptive teacher has no use for method.beta (its token weight is beta0 / alpha_t).
    assert staged["distil"].applied == ["distil:method.r=12"] and staged["distil"].dropped == ["method.beta=0.3"]
    # A key a stage's method does not use leaves that stage's fingerprint as it was.
    glob = {s.name: s for s in load_pipeline(pipe, ["method.r=12", "model.dpo_model=" + tiny_ws["model2"]])}
    assert glob["dpo"].fingerprint == plain["dpo"].fingerprint
    assert glob["reverse_dpo"].fingerprint == plain["reverse_dpo"].fingerprint
    assert glob["distil"].fingerprint != plain["distil"].fingerprint
    assert glob["dpo"].cfg.model.dpo_model is None
    # ... but the teachers' fingerprints change, and so the stage reading them does.
    beta = {s.name: s for s in load_pipeline(pipe, ["dpo:method.beta=0.2"])}
    assert beta["reverse_dpo"].fingerprint == plain["reverse_dpo"].fingerprint
    assert beta["distil"].cfg.fingerprint() == plain["distil"].cfg.fingerprint()
    assert beta["distil"].fingerprint != plain["distil"].fingerprint
    # A stage reference given on the command line resolves like one in the file.
    (ref,) = [s for s in load_pipeline(pipe, ["distil:model.dpo_model=stage:reverse_dpo"]) if s.name == "distil"]
    assert ref.cfg.model.dpo_model == str(tmp_path / "out" / "reverse_dpo") and ref.upstream == ["reverse_dpo"]
    with pytest.raises(ConfigError, match="no stage 'nosuch'.*dpo, reverse_dpo, distil"):
        load_pipeline(pipe, ["nosuch:method.r=1"])
    with pytest.raises(ConfigError, match="dpo:method.r=12 sets method.r, which method dpo does not use"):
        load_pipeline(pipe, ["dpo:method.r=12"])
    with pytest.raises(ConfigError, match="unknown key method.rr"):
        load_pipeline(pipe, ["distil:method.rr=1"])


def test_every_method_declares_the_keys_it_uses():
    keys = {f.name for f in dataclasses.fields(MethodConfig)}
    for name in METHOD_NAMES:
        variants = [{"mode": m, "teacher": t} for m in MODES for t in TEACHERS] if name == "aligndistil" else [{}]
        for v in variants:
            m = get_method(MethodConfig(name=name, **v))
            assert m.params is not None and set(m.params) <= keys, name
    on = get_method(MethodConfig(name="aligndistil", mode="on_policy"))
    off = get_method(MethodConfig(name="aligndistil", mode="off_policy", teacher="constant"))
    assert on.uses("method.max_new_tokens") and on.uses("method.r") and not on.uses("method.alpha")
    assert off.uses("method.alpha") and not off.uses("method.max_new_tokens") and not off.uses("method.r")
    dpo = get_method(MethodConfig(name="dpo"))
    assert dpo.uses("method.beta") and dpo.uses("method.name") and dpo.uses("train.max_steps")
    assert not dpo.uses("model.dpo_model") and dpo.uses("model.reference") and dpo.uses("model.policy")


# --------------------------------------------------------------------------- item 4: bf16 on a CPU
def test_half_precision_on_a_cpu_is_warned_at_the_start(tiny_ws, tmp_path, monkeypatch):
    stages = load_pipeline(REPO / "configs" / "pipelines" / "paper.yaml", out=tmp_path)
    assert all(s.cfg.model.dtype == "bfloat16" for s in stages)  # the papers' value is kept
    (line,) = precision_warnings(stages, cuda=False)
    assert "dpo, reverse_dpo, aligndistil_off_policy, aligndistil_on_policy ask for model.dtype=bfloat16" in line
    assert "slow" in line and "rounded to bfloat16" in line and "model.dtype=float32" in line
    assert precision_warnings(stages, cuda=True) == []
    assert precision_warnings(load_pipeline(stages_file(tmp_path)), cuda=False) == []
    # The dry run and the run print it first (both call precision_warnings), here for an override.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (line,) = plan(write_pipeline(tmp_path, tiny_ws), ["dpo:model.dtype=bfloat16"])["warnings"]
    assert "stage dpo asks for model.dtype=bfloat16" in line


def stages_file(tmp_path) -> Path:
    p = tmp_path / "f32.yaml"
    p.write_text("stages:\n  - name: a\n")
    return p
