"""What the studies start from, shared by the convergence and the frontier study.

Both studies train many runs of the one trainer from the same three models: the initial
policy and the DPO / reverse-DPO teachers whose log-ratio is AlignDistil's contrastive reward
(Eq. 12). This module is their one home for:

* :class:`StudyInputs`: the settings fields every study has (its output folder and the
  models it starts from), which :class:`~aligndistil.workflows.convergence.StudySettings`
  and :class:`~aligndistil.workflows.frontier.FrontierSettings` inherit;
* :func:`teachers`: the models as given, else the quickstart's finished ones, else trained
  exactly as the quickstart trains them (into its folder, so a later quickstart reuses them);
* :func:`tiny_inputs`: the test-sized stand-ins (the tiny random model, its synthetic pairs,
  teachers trained on them for 4 steps);
* :func:`train_run`: one run under ``<out>/runs/<name>``, skipped when finished with the same
  config, resumed when interrupted, so a study can be stopped and started again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aligndistil.errors import AlignDistilError
from aligndistil.fileio import atomic_write_text

__all__ = ["StudyError", "StudyInputs", "quickstart_spec", "quickstart_teachers", "teachers", "teachers_ready",
           "tiny_inputs", "train_run"]


class StudyError(AlignDistilError, ValueError):
    """A study setting that cannot work (exit code 2), found before any model loads or folder is made."""


@dataclass
class StudyInputs:
    """The settings fields every study shares; each study's settings class inherits them first.

    A study redeclares ``out_dir`` with its own default; the others default to the quickstart's.
    """

    out_dir: str
    quickstart_config: str | None = None  # default: configs/pipelines/quickstart.yaml
    policy: str | None = None  # default: the quickstart's base.model.policy
    dpo_model: str | None = None  # default: the quickstart's, reused or trained
    reverse_dpo_model: str | None = None


def quickstart_spec(s: StudyInputs) -> tuple[dict, Path]:
    """The quickstart's pipeline spec (``s.quickstart_config`` or the default) and its output folder."""
    from aligndistil.workflows.quickstart import default_config, load_quickstart

    spec, _ = load_quickstart(s.quickstart_config or default_config())
    return spec, Path(spec.get("output_dir") or "outputs/quickstart")


def quickstart_teachers(qs: Path) -> tuple[str, str] | None:
    """``(dpo, reverse_dpo)`` folders of the quickstart output ``qs`` when both are finished runs, else None."""
    from aligndistil.train.checkpoints import is_complete

    if is_complete(qs / "dpo") and is_complete(qs / "reverse_dpo"):
        return str(qs / "dpo"), str(qs / "reverse_dpo")
    return None


def teachers_ready(s: StudyInputs) -> bool:
    """True when :func:`teachers` would train nothing: both models given, or the quickstart's finished.

    For planning only: an unreadable quickstart config counts as not ready (the run itself reports it).
    """
    if s.dpo_model and s.reverse_dpo_model:
        return True
    try:
        _, qs = quickstart_spec(s)
    except (AlignDistilError, FileNotFoundError):
        return False
    return quickstart_teachers(qs) is not None


def teachers(s: StudyInputs, progress: bool, log) -> tuple[str, str, str]:
    """``(policy, dpo, reverse_dpo)``: given, the quickstart's finished ones, or trained as it trains them.

    Training uses the quickstart's own pairs and its ``dpo`` and ``reverse_dpo`` stages, written into the
    quickstart's folder, so the study and a later quickstart share one pair of teachers.

    Raises:
        StudyError: the teachers must be trained and the quickstart config has no such stages.
    """
    from aligndistil.workflows.pipeline import run_pipeline
    from aligndistil.workflows.quickstart import prefs, write_pipeline

    spec, qs = quickstart_spec(s)
    policy = s.policy or spec["base"]["model"]["policy"]
    if s.dpo_model and s.reverse_dpo_model:
        return policy, s.dpo_model, s.reverse_dpo_model
    done = quickstart_teachers(qs)
    if done:
        log(f"[study] reusing the quickstart's teachers: {done[0]}, {done[1]}")
        return (policy, *done)
    stages = {st.get("name"): st for st in spec["stages"]}
    if not {"dpo", "reverse_dpo"} <= set(stages):
        raise StudyError(f"{spec['_source']} has no dpo and reverse_dpo stages to train the teachers with")
    log(f"[study] training the teachers as the quickstart does, into {qs}")
    spec["stages"] = [stages["dpo"], stages["reverse_dpo"]]
    pairs = prefs(spec, "prefs", qs, policy, progress, log)
    pipe = write_pipeline(spec, pairs, Path(s.out_dir) / "teachers_pipeline.yaml")
    dpo, rev = run_pipeline(pipe, [] if progress else ["train.progress_bar=false"], log=log)
    return policy, str(dpo), str(rev)


def tiny_inputs(out_dir: str | Path, beta0: float, log) -> tuple[str, str, str, Path]:
    """``(policy, dpo, reverse_dpo, pairs)`` of the test-sized study, under ``<out_dir>/tiny``.

    The tiny random model and its synthetic pairs (made once), and DPO / reverse-DPO teachers of
    ``beta = beta0`` trained on those pairs for 4 steps (a finished teacher is reused): seconds on a
    CPU, enough to exercise the study's machinery, nothing more.
    """
    import yaml

    from aligndistil.model.tiny import make_tiny_workspace
    from aligndistil.workflows.pipeline import run_pipeline

    root = Path(out_dir) / "tiny"
    if not (root / "model" / "config.json").is_file():
        make_tiny_workspace(root)
    pipe = {"output_dir": str(root), "stages": [
        {"name": "dpo", "overrides": {"method": {"name": "dpo", "beta": beta0}}},
        {"name": "reverse_dpo", "overrides": {"method": {"name": "dpo", "beta": beta0, "reverse": True}}}],
        "base": {"model": {"policy": str(root / "model")},
                 "data": {"train_file": str(root / "prefs.jsonl"), "max_length": 64, "max_prompt_length": 32},
                 "train": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "per_device_batch_size": 4, "max_steps": 4,
                           "progress_bar": False}}}
    path = atomic_write_text(root / "teachers.yaml", yaml.safe_dump(pipe, sort_keys=False))
    dpo, rev = run_pipeline(path, log=log)
    return str(root / "model"), str(dpo), str(rev), root / "prefs.jsonl"


def train_run(cfg, log) -> Path:
    """Train the run ``cfg`` (a validated RunConfig) into ``cfg.train.output_dir``; returns that folder.

    A run whose ``COMPLETE.json`` records the same config fingerprint is skipped, and one with numbered
    checkpoints is resumed from the latest, so re-running an interrupted study redoes no finished work.
    """
    from aligndistil.train.checkpoints import is_complete, numbered_checkpoints
    from aligndistil.train.loop import train

    out = Path(cfg.train.output_dir)
    if is_complete(out, cfg.fingerprint()):
        log(f"[study] {out.name}: complete, skipped")
        return out
    resume = out.is_dir() and bool(numbered_checkpoints(out))
    log(f"[study] {out.name}: {'resuming' if resume else 'training'} {cfg.train.max_steps} steps")
    return train(cfg, resume=resume)
