"""The paper's pipeline as stages: (SFT) -> DPO -> reverse DPO -> AlignDistil, and baselines.

A pipeline file names an ``output_dir``, a ``base`` run config applied to every stage, and
an ordered list of ``stages``. Each stage has a ``name`` (its output folder is
``output_dir/name``), an optional ``config`` file (relative to the pipeline file) and
``overrides``. Any string value ``stage:NAME`` is replaced by the output folder of the
earlier stage ``NAME``; that is how the DPO model reaches the AlignDistil stage.

Resuming: a stage whose folder holds a ``COMPLETE.json`` with the same fingerprint (its own
config plus the fingerprints of the stages it reads from) is skipped, so a pipeline that
died resumes at the stage that did not finish, and deleting one stage's output reruns only
that stage and the stages that read from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from aligndistil.config import ConfigError, RunConfig, apply_overrides, from_dict, load_yaml
from aligndistil.train.loop import COMPLETE, is_complete, train


@dataclass
class Stage:
    """One resolved stage of a pipeline."""

    name: str
    cfg: RunConfig
    upstream: list
    fingerprint: str = ""


def deep_merge(a: dict, b: dict) -> dict:
    """``b`` merged into a copy of ``a`` (nested mappings merged, other values replaced)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_stage_refs(d, outputs: dict, where: str, used: list):
    if isinstance(d, dict):
        return {k: _resolve_stage_refs(v, outputs, f"{where}.{k}", used) for k, v in d.items()}
    if isinstance(d, str) and d.startswith("stage:"):
        name = d[len("stage:"):]
        if name not in outputs:
            raise ConfigError(f"{where}: {d!r} refers to no EARLIER stage (known: {list(outputs)})")
        used.append(name)
        return str(outputs[name])
    return d


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> list[Stage]:
    """Read a pipeline file and resolve every stage's RunConfig (nothing is run)."""
    path = Path(path)
    spec = load_yaml(path)
    for key in spec:
        if key not in ("output_dir", "base", "stages"):
            raise ConfigError(f"{path}: unknown top-level key {key!r} (expected output_dir, base, stages)")
    if not spec.get("stages"):
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    root = Path(spec.get("output_dir") or "outputs/pipeline")
    outputs: dict[str, Path] = {}
    stages: list[Stage] = []
    for i, st in enumerate(spec["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict) or "name" not in st:
            raise ConfigError(f"{where} must be a mapping with a 'name'")
        unknown = set(st) - {"name", "config", "overrides"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = str(st["name"])
        if name in outputs:
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        merged = copy.deepcopy(spec.get("base") or {})
        if st.get("config"):
            merged = deep_merge(merged, load_yaml(path.parent / st["config"]))
        merged = deep_merge(merged, st.get("overrides") or {})
        used: list[str] = []
        merged = _resolve_stage_refs(merged, outputs, where, used)
        merged = deep_merge(merged, {"train": {"output_dir": str(root / name)}})
        cfg = apply_overrides(from_dict(merged, where), overrides or [])
        fp_parts = [cfg.fingerprint()] + [s.fingerprint for s in stages if s.name in used]
        fp = hashlib.sha256("|".join(fp_parts).encode()).hexdigest()[:16]
        stages.append(Stage(name=name, cfg=cfg, upstream=used, fingerprint=fp))
        outputs[name] = root / name
    return stages


def run_pipeline(path: str | Path, overrides: list[str] | None = None, log=print) -> list[Path]:
    """Run the stages in order, skipping those already complete with the same fingerprint."""
    outs = []
    for st in load_pipeline(path, overrides):
        out = Path(st.cfg.train.output_dir)
        if is_complete(out, st.fingerprint):
            log(f"[pipeline] {st.name}: complete in {out}, skipped")
        else:
            log(f"[pipeline] {st.name}: training {st.cfg.method.name} -> {out}")
            # A stage folder holding a finished run of other settings is this pipeline's own
            # earlier result of the stage: retraining it replaces it (the trainer refuses to
            # write over a finished run unless told to).
            train(st.cfg, fingerprint=st.fingerprint, overwrite=(out / COMPLETE).is_file())
        outs.append(out)
    return outs


def stage_summary(path: str | Path) -> dict:
    """Each stage's status (for ``aligndistil pipeline --dry-run``)."""
    res = {}
    for st in load_pipeline(path):
        out = Path(st.cfg.train.output_dir)
        done = json.loads((out / COMPLETE).read_text()) if is_complete(out, st.fingerprint) else None
        res[st.name] = {"method": st.cfg.method.name, "output": str(out), "complete": bool(done), "reads": st.upstream}
    return res
