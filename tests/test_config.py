"""Every shipped config is valid, and bad configs fail with messages that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligndistil.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config
from aligndistil.train.methods import get_method
from aligndistil.workflows.pipeline import load_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name in ("configs", "tiny"))


def test_there_is_a_config_per_method_and_a_tiny_twin():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"sft", "dpo", "reverse_dpo", "ipo", "simpo", "dpop", "kto", "tdpo1", "tdpo2", "sparsepo", "mapo",
            "aligndistil_off_policy", "aligndistil_on_policy", "aligndistil_constant"} <= names
    assert names == {p.stem for p in (CONFIGS / "tiny").glob("*.yaml")}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_run_config_is_valid(path):
    cfg = load_config(path)
    method = get_method(cfg.method)  # validates method-specific options
    assert cfg.model.policy and cfg.data.train_file
    for role in method.frozen:
        if role != "reference":
            assert getattr(cfg.model, role), f"{path} lacks model.{role}"


@pytest.mark.parametrize("path", sorted((CONFIGS / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_is_valid(path, tmp_path):
    import yaml

    if "prefs" in yaml.safe_load(path.read_text()):
        # A quickstart file: it makes its preference pairs first, then writes a plain pipeline.
        from aligndistil.workflows.quickstart import load_quickstart, write_pipeline

        spec, _ = load_quickstart(path)
        path = write_pipeline(spec, tmp_path / "pairs.jsonl", tmp_path / "pipeline.yaml")
    stages = load_pipeline(path)
    assert [s.name for s in stages][:2] == ["dpo", "reverse_dpo"]
    distil = [s for s in stages if s.cfg.method.name == "aligndistil"]
    assert distil and all(s.upstream == ["dpo", "reverse_dpo"] for s in distil)
    for s in distil:
        assert s.cfg.model.dpo_model.endswith("dpo") and s.cfg.model.reverse_dpo_model.endswith("reverse_dpo")


def test_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), ["method.beta=0.2", "train.max_steps=7", "method.reverse=true",
                                        "train.report_to=[tensorboard]", "model.reference=none"])
    assert cfg.method.beta == 0.2 and cfg.train.max_steps == 7 and cfg.method.reverse is True
    assert cfg.train.report_to == ["tensorboard"] and cfg.model.reference is None


@pytest.mark.parametrize("bad, match", [
    (["method.betta=0.2"], "unknown key method.betta"),
    (["nosection.beta=1"], "key must be one of"),
    (["method.beta"], "section.key=value"),
    (["train.max_steps=abc"], "expected int"),
    (["train.max_steps=1.5"], "expected an integer"),
    (["method.reverse=maybe"], "expected true/false"),
])
def test_bad_overrides_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(RunConfig(), bad)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("method:\n  name: dpo\n  betaa: 0.1\n")
    with pytest.raises(ConfigError, match=r"x\.yaml.*method\.betaa"):
        load_config(p)
    p.write_text("method: [1, 2\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_ignores_output_dir_but_not_hyperparameters():
    a = from_dict({"method": {"beta": 0.1}, "train": {"output_dir": "a"}})
    b = from_dict({"method": {"beta": 0.1}, "train": {"output_dir": "b"}})
    c = from_dict({"method": {"beta": 0.2}, "train": {"output_dir": "a"}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("opts, match", [
    ({"name": "nope"}, "method.name must be one of"),
    ({"name": "aligndistil", "teacher": "x"}, "method.teacher"),
    ({"name": "aligndistil", "mode": "x"}, "method.mode"),
])
def test_bad_method_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_method(from_dict({"method": opts}).method)
