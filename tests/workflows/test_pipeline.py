"""The DPO -> reverse DPO -> AlignDistil pipeline end to end, and its resume-by-skipping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aligndistil.config import ConfigError
from aligndistil.workflows.pipeline import load_pipeline, run_pipeline


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
