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


@pytest.mark.parametrize("bad, says", [
    ("model.dtype=float33", "model.dtype must be one of float32, bfloat16, float16, got 'float33'"),
    ("model.dtype=nn", "model.dtype must be one of float32, bfloat16, float16, got 'nn'"),
    ("method.beta=0", "method.beta must be > 0, got 0.0"),
    ("method.beta=-0.1", "method.beta must be > 0"),
    ("method.beta=.nan", "method.beta must be a finite number"),
    ("method.r=-1", "method.r must be >= 0"),
    ("method.beta0=0", "method.beta0 must be > 0"),
    ("method.eps=0", "method.eps must be > 0"),
    ("method.top_p=0", r"method.top_p must be in \(0, 1\]"),
    ("method.max_new_tokens=0", "method.max_new_tokens must be >= 1"),
    ("train.max_steps=-1", "train.max_steps must be >= 0"),
    ("train.num_epochs=0", "train.num_epochs must be > 0"),
    ("train.warmup_ratio=-0.1", r"train.warmup_ratio must be in \[0, 1\]"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio must be in \[0, 1\]"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
    ("train.save_total_limit=0", "train.save_total_limit must be >= 1"),
    ("train.learning_rate=0", "train.learning_rate must be > 0"),
    ("train.adam_betas=[0.9]", r"train.adam_betas must be two numbers in \[0, 1\)"),
    ("train.optimizer=adam", "train.optimizer must be adamw or sgd"),
    ("train.report_to=[wandb,neptune]", "train.report_to: unknown logger 'neptune' \\(known: none, jsonl, tensorboard, wandb\\)"),
    ("train.save_strategy=always", "train.save_strategy must be one of steps, epoch, no"),
    ("data.eval_split_ratio=1", r"data.eval_split_ratio must be in \[0, 1\)"),
    ("train.hub_model_id=a/b/c", "train.hub_model_id must be ORG/NAME or NAME"),
    ("data.max_examples=-1", "data.max_examples must be >= 1"),
    ("data.max_examples=0", "data.max_examples must be >= 1"),
    ("data.max_length=1", "data.max_length must be >= 2"),
])
def test_every_value_is_checked_before_anything_runs(bad, says, tmp_path):
    """Ranges live with the fields; load_config (and the trainer) refuse a value naming its key."""
    p = tmp_path / "run.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError, match=says):
        load_config(p, [bad])
    cfg = apply_overrides(RunConfig(), [bad])
    with pytest.raises(ConfigError, match=says):
        cfg.validate()


def test_every_shipped_config_passes_the_range_checks():
    for path in RUN_CONFIGS:
        load_config(path).validate()


def test_a_folder_given_as_config_says_so(tmp_path):
    (tmp_path / "dpo.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"is a folder; give a YAML config file such as .*dpo\.yaml"):
        load_config(tmp_path)


def test_field_types_are_resolved_without_eval():
    """Annotations are read with typing.get_type_hints, never eval() of their strings."""
    import ast

    import aligndistil.config as C

    for module in Path(C.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "eval"]
    cfg = apply_overrides(RunConfig(), ["data.max_examples=null", "train.chunk_size=64", "model.reference=none"])
    assert cfg.data.max_examples is None and cfg.train.chunk_size == "64" and cfg.model.reference is None


def test_config_help_shows_the_allowed_range():
    from aligndistil.config import help_text

    text = help_text()
    assert "(allowed: > 0)" in text and "(allowed: one of float32, bfloat16, float16)" in text
    assert "train.overwrite_output_dir" in text


def test_overwrite_and_display_settings_are_not_part_of_the_fingerprint():
    a = from_dict({"train": {"overwrite_output_dir": True, "save_total_limit": 1}})
    assert a.fingerprint() == RunConfig().fingerprint()


def test_missing_local_paths_are_named_with_a_hint(tmp_path):
    from aligndistil.config import check_paths

    cfg = from_dict({"model": {"policy": str(tmp_path / "outputs" / "tiny" / "model")},
                     "data": {"train_file": str(tmp_path / "outputs" / "tiny" / "prefs.jsonl")}})
    with pytest.raises(ConfigError, match=r"model.policy: .*tiny/model does not exist \(the tiny configs read .*"
                                          r"run `aligndistil make-tiny --out .*tiny` first\)"):
        check_paths(cfg)
    (tmp_path / "m").mkdir()
    cfg = from_dict({"model": {"policy": str(tmp_path / "m"), "dpo_model": str(tmp_path / "runs" / "dpo")},
                     "data": {"train_file": str(tmp_path / "m")}})
    with pytest.raises(ConfigError, match=r"model.dpo_model: .* does not exist \(the train.output_dir of a DPO run"):
        check_paths(cfg, roles=("dpo_model",))
    check_paths(from_dict({"model": {"policy": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train_file": str(tmp_path / "m")}}))
