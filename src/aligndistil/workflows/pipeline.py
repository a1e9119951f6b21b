"""The paper's pipeline as stages: (SFT) -> DPO -> reverse DPO -> AlignDistil, and baselines.

A pipeline file names an ``output_dir``, a ``base`` run config applied to every stage, and
an ordered list of ``stages``. Each stage has a ``name``, an optional ``config`` file and
``overrides`` (a nested mapping). Any string value ``stage:NAME`` (in the file or in a
command-line override) is replaced by the output folder of the earlier stage ``NAME``;
that is how the DPO model reaches the AlignDistil stage.

Where outputs go: stage ``NAME`` writes to ``OUT/NAME``, where ``OUT`` is ``--out`` (the
``out`` argument) or else the file's ``output_dir``, and ``stage:NAME`` resolves to that
same folder, so a pipeline moved elsewhere reads its own teachers, never an older run's.
``train.output_dir`` is therefore refused as an override (on the command line, in ``base``
and in a stage's ``overrides``), with a message pointing at ``--out``; a stage ``config``
file's own ``train.output_dir`` is replaced.

Stage config files: a relative ``config:`` path is looked up (1) next to the pipeline file,
(2) in ``configs/`` of the working directory, (3) in ``configs/`` of the aligndistil source
checkout; the first that exists is used (``--dry-run`` prints which). So the shipped
``configs/pipelines/paper.yaml`` (``config: dpo.yaml``) still works when copied elsewhere,
and a ``dpo.yaml`` placed next to the copy wins.

Overrides (:func:`split_overrides`): ``section.key=value`` applies to every stage that uses
the key, ``STAGE:section.key=value`` to stage ``STAGE`` only (after the global ones). A
global override of a key the stage's method does not use (:meth:`Method.uses`, declared in
:mod:`aligndistil.train.methods`: ``method.r`` for DPO, ``method.max_new_tokens`` off-policy,
``model.dpo_model`` for DPO ...) is DROPPED for that stage: not applied, so the stage's
saved config and fingerprint are exactly those without it and its finished run is reused.
A per-stage override of such a key is refused (it can only be a mistake).

Every stage is resolved and checked (keys, ranges, method options, required teachers,
local paths that do not come from an earlier stage) before any stage runs; errors name the
stage and its config file, all stages' errors at once.

Resuming: a stage whose folder holds a ``COMPLETE.json`` with the same fingerprint (its own
config plus the fingerprints of the stages it reads from) is skipped, so a pipeline that
died resumes at the stage that did not finish, and deleting one stage's output reruns only
that stage and the stages that read from it. The dry run (:mod:`aligndistil.workflows.pipeline_plan`)
reports exactly this decision.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from aligndistil.config import ConfigError, RunConfig, apply_overrides, check_paths, from_dict, load_yaml
from aligndistil.train.checkpoints import COMPLETE, is_complete
from aligndistil.train.methods import Method, get_method

STAGE_REF = "stage:"
OUTPUT_KEYS = ("output_dir", "train.output_dir")
_TOP_KEYS = ("output_dir", "base", "stages")


@dataclass
class Stage:
    """One resolved stage of a pipeline.

    Attributes:
        name: the stage name (its output folder is ``OUT/name``).
        cfg: the run config exactly as the stage trains it.
        upstream: names of the earlier stages it reads (its ``stage:NAME`` references).
        fingerprint: what its ``COMPLETE.json`` records (its config and its upstream's).
        config_file: the stage ``config:`` file used, or None.
        applied: the command-line overrides applied (global ones, then the stage's own).
        dropped: global overrides not applied because the stage's method does not use the key.
        refs: ``section.key -> stage name`` of every value that came from ``stage:NAME``.
        method: the method's declaration.
    """

    name: str
    cfg: RunConfig
    upstream: list
    fingerprint: str = ""
    config_file: str | None = None
    applied: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    refs: dict = field(default_factory=dict)
    method: Method | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def deep_merge(a: dict, b: dict) -> dict:
    """``b`` merged into a copy of ``a`` (nested mappings merged, other values replaced)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _refuse_output_dir(what: str) -> None:
    raise ConfigError(f"{what}: a pipeline's stages write to OUT/<stage name>, and stage:NAME references "
                      "follow them; give the folder as `aligndistil pipeline --out DIR` (or the pipeline "
                      "file's top-level output_dir), not train.output_dir")


def split_overrides(overrides: list[str] | None, stage_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides -> ``(global, {stage: [its own]})``.

    ``STAGE:section.key=value`` targets one stage (the ``:`` is looked for before the ``=``
    only, so values such as ``stage:dpo`` or ``module:function`` are untouched). Unknown
    stages, unknown keys (``bogus.key=1``) and ``train.output_dir`` are refused here, once,
    before any stage is resolved.
    """
    glob: list[str] = []
    staged: dict[str, list[str]] = {n: [] for n in stage_names}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value or STAGE:section.key=value")
        stage, colon, dotted = key.strip().rpartition(":")
        if dotted.strip() in OUTPUT_KEYS:
            _refuse_output_dir(f"override {item!r}")
        plain = f"{dotted.strip()}={value}"
        apply_overrides(RunConfig(), [plain])  # an unknown section or key fails here, naming it
        if colon:
            if stage not in staged:
                raise ConfigError(f"override {item!r}: there is no stage {stage!r} (stages: {', '.join(stage_names)})")
            staged[stage].append(plain)
        else:
            glob.append(item)
    return glob, staged


def config_dirs() -> list[Path]:
    """Where a relative stage ``config:`` path is looked up after the pipeline file's folder:
    ``configs/`` of the working directory, then of the aligndistil source checkout."""
    dirs = [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [e.resolve() for e in dirs[:i]]]


def find_stage_config(ref: str, pipeline_file: Path, where: str) -> Path:
    """The stage config file ``ref`` names (module docstring: the lookup rule)."""
    p = Path(os.path.expanduser(str(ref)))
    tried = [p] if p.is_absolute() else [pipeline_file.parent / p] + [d / p for d in config_dirs()]
    for cand in tried:
        if cand.is_file():
            return cand
    raise ConfigError(f"{where}: config file {ref!r} not found (looked at: {', '.join(str(c) for c in tried)})")


def _method(cfg: RunConfig, where: str) -> Method:
    try:
        return get_method(cfg.method)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _resolve_refs(cfg: RunConfig, outputs: dict, where: str) -> dict:
    """Replace every ``stage:NAME`` string value by that earlier stage's folder; returns
    ``{section.key: NAME}``."""
    refs = {}
    for sec in ("model", "data", "train", "method"):
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, str) and v.startswith(STAGE_REF):
                name = v[len(STAGE_REF):]
                if name not in outputs:
                    raise ConfigError(f"{where}: {sec}.{f.name} = {v!r} refers to no EARLIER stage "
                                      f"(known: {list(outputs)})")
                setattr(obj, f.name, str(outputs[name]))
                refs[f"{sec}.{f.name}"] = name
    return refs


def _sets_output_dir(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("train"), dict) and "output_dir" in d["train"]


def _resolve_stage(st: dict, where: str, spec: dict, path: Path, root: Path, outputs: dict, done: list,
                   glob: list[str], own: list[str]) -> Stage:
    name = str(st["name"])
    if _sets_output_dir(st.get("overrides")):
        _refuse_output_dir(f"{where} overrides: train.output_dir")
    merged = copy.deepcopy(spec.get("base") or {})
    cfile = None
    if st.get("config"):
        cfile = find_stage_config(st["config"], path, where)
        where = f"{where} ({cfile})"
        merged = deep_merge(merged, load_yaml(cfile))
    merged = deep_merge(merged, st.get("overrides") or {})
    base_cfg = from_dict(merged, where)
    # Which keys the method uses depends on the method the overrides select (method.name,
    # mode, teacher): ask the declaration with everything applied, then keep what it uses.
    method = _method(apply_overrides(copy.deepcopy(base_cfg), glob + own), where)
    kept = [o for o in glob if method.uses(_key(o))]
    dropped = [o for o in glob if not method.uses(_key(o))]
    for o in own:
        if not method.uses(_key(o)):
            raise ConfigError(f"{where}: override {name}:{o} sets {_key(o)}, which method {method.name} does not use")
    cfg = apply_overrides(base_cfg, kept + own)
    refs = _resolve_refs(cfg, outputs, where)
    cfg.train.output_dir = str(root / name)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    method = _method(cfg, where)
    for role in method.frozen:
        if role != "reference" and not getattr(cfg.model, role):
            raise ConfigError(f"{where}: method {method.name} needs model.{role} (a folder, or stage:NAME "
                              "for an earlier stage's output)")
    upstream = list(dict.fromkeys(refs.values()))
    fp_parts = [cfg.fingerprint()] + [s.fingerprint for s in done if s.name in upstream]
    fp = hashlib.sha256("|".join(fp_parts).encode()).hexdigest()[:16]
    return Stage(name=name, cfg=cfg, upstream=upstream, fingerprint=fp, config_file=str(cfile) if cfile else None,
                 applied=kept + [f"{name}:{o}" for o in own], dropped=dropped, refs=refs, method=method)


def load_pipeline(path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> list[Stage]:
    """Read a pipeline file and resolve and check every stage's RunConfig (nothing is run,
    no file is read but the configs). ``out`` replaces the file's ``output_dir``.

    Raises:
        ConfigError: naming the file, the stage and its config file; the errors of all
            stages together.
    """
    path = Path(path)
    spec = load_yaml(path)
    for key in spec:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{path}: unknown top-level key {key!r} (expected {', '.join(_TOP_KEYS)})")
    if not spec.get("stages") or not isinstance(spec["stages"], list):
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    names: list[str] = []
    for i, st in enumerate(spec["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict) or "name" not in st:
            raise ConfigError(f"{where} must be a mapping with a 'name'")
        unknown = set(st) - {"name", "config", "overrides"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = str(st["name"])
        if name in names:
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        if not name or any(c in name for c in ":=") or name in (".", ".."):
            raise ConfigError(f"{where}: stage name {name!r} must be a folder name without ':' or '='")
        names.append(name)
    if _sets_output_dir(spec.get("base")):
        _refuse_output_dir(f"{path}: base: train.output_dir")
    glob, staged = split_overrides(overrides, names)
    root = Path(out or spec.get("output_dir") or "outputs/pipeline")
    outputs: dict[str, Path] = {}
    stages: list[Stage] = []
    errors: list[str] = []
    for i, st in enumerate(spec["stages"]):
        name = names[i]
        try:
            stages.append(_resolve_stage(st, f"{path}: stages[{i}] {name!r}", spec, path, root, outputs, stages,
                                         glob, staged[name]))
        except ConfigError as e:
            errors.append(str(e))
        outputs[name] = root / name  # later stages may still refer to it: their own errors are reported too
    if errors:
        raise ConfigError("\n".join(errors))
    return stages


def input_problems(stages: list[Stage]) -> list[str]:
    """Each stage's local model path or ``data.train_file`` that does not exist, one line
    each naming the stage (folders an earlier stage will write are not checked)."""
    errors = []
    for st in stages:
        roles = tuple(r for r in st.method.frozen if f"model.{r}" not in st.refs)
        try:
            check_paths(st.cfg, roles=roles)
        except ConfigError as e:
            errors.append(f"stage {st.name!r}{f' ({st.config_file})' if st.config_file else ''}: {e}")
    return errors


def check_inputs(stages: list[Stage]) -> None:
    """Refuse, before anything runs, the :func:`input_problems` of every stage at once."""
    errors = input_problems(stages)
    if errors:
        raise ConfigError("\n".join(errors))


def status(st: Stage) -> str:
    """``skip`` (complete with the same fingerprint), ``retrain`` (complete with other settings:
    replaced) or ``run``."""
    if is_complete(st.output_dir, st.fingerprint):
        return "skip"
    return "retrain" if (st.output_dir / COMPLETE).is_file() else "run"


def precision_warnings(stages: list[Stage], cuda: bool | None = None) -> list[str]:
    """One line per requested ``model.dtype`` of bfloat16 / float16 when no GPU is present:
    which stages, what it costs, and the override that avoids it (the papers' configs ask for
    bfloat16 and keep it; the run is not refused)."""
    import torch

    from aligndistil.train.accel import choose_mixed_precision

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return []
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    by_dtype: dict[str, list[str]] = {}
    for st in stages:
        if st.cfg.model.dtype != "float32":
            by_dtype.setdefault(st.cfg.model.dtype, []).append(st.name)
    lines = []
    for dtype, names in by_dtype.items():
        _, note = choose_mixed_precision(dtype, on_cpu=True, launched=launched)
        note = (note or "").rstrip(". ")
        who = f"stage {names[0]} asks" if len(names) == 1 else f"stages {', '.join(names)} ask"
        lines.append(f"[pipeline] warning: no GPU here and {who} for model.dtype={dtype}. "
                     f"{note}{'. ' if note else ''}The frozen models (reference, teachers) are held in {dtype}, so their "
                     f"log-probs and the AlignDistil teacher are rounded to {dtype}. "
                     f"Add model.dtype=float32 for a CPU run (README: 'Your own data').")
    return lines


def run_pipeline(path: str | Path, overrides: list[str] | None = None, log=print,
                 out: str | Path | None = None) -> list[Path]:
    """Run the stages in order, skipping those already complete with the same fingerprint.

    Every stage is resolved and its inputs checked first (:func:`load_pipeline`,
    :func:`check_inputs`); ``out`` replaces the file's ``output_dir``.
    """
    from aligndistil.train.loop import train

    stages = load_pipeline(path, overrides, out)
    check_inputs(stages)
    for line in precision_warnings(stages):
        log(line)
    outs = []
    for st in stages:
        o = st.output_dir
        if st.dropped:
            log(f"[pipeline] {st.name}: not applied, method {st.method.name} does not use them: {' '.join(st.dropped)}")
        if status(st) == "skip":
            log(f"[pipeline] {st.name}: complete in {o}, skipped")
        else:
            log(f"[pipeline] {st.name}: training {st.cfg.method.name} -> {o}")
            # A stage folder holding a finished run of other settings is this pipeline's own
            # earlier result of the stage: retraining it replaces it (the trainer refuses to
            # write over a finished run unless told to).
            train(st.cfg, fingerprint=st.fingerprint, overwrite=(o / COMPLETE).is_file())
        outs.append(o)
    return outs
