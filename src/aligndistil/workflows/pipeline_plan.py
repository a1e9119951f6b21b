"""``aligndistil pipeline --dry-run``: what a run would do, resolved exactly as a run resolves it.

:func:`plan` calls the same :func:`aligndistil.workflows.pipeline.load_pipeline` and
:func:`~aligndistil.workflows.pipeline.check_inputs` as a run (so an override a run would
refuse, such as ``bogus.key=1``, fails the dry run the same way; missing input files are
listed after the plan and make the command exit 2) and reports per stage: its
config file, output folder, whether it would run, be skipped (complete with the same
fingerprint) or retrain (complete with other settings), the overrides applied to it and
those dropped because its method does not use the key, and its effective config as its
differences from the defaults (``aligndistil config-help`` lists the defaults).
"""

from __future__ import annotations

from pathlib import Path

from aligndistil.config import RunConfig
from aligndistil.workflows.pipeline import input_problems, load_pipeline, precision_warnings, status

_SAYS = {"skip": "skip: complete with the same fingerprint",
         "retrain": "would retrain: complete with other settings, which this run replaces",
         "run": "would run: no finished run there"}


def config_changes(cfg: RunConfig) -> dict:
    """``{section.key: value}`` of every setting that differs from :class:`RunConfig`'s default."""
    default, mine = RunConfig().to_dict(), cfg.to_dict()
    return {f"{sec}.{k}": v for sec, values in mine.items() for k, v in values.items() if default[sec][k] != v}


def plan(path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> dict:
    """The dry run as data: ``{"pipeline", "output_dir", "warnings", "problems", "stages": [...]}``;
    ``problems`` are the missing inputs a run would refuse to start with (a config error
    raises, as in a run)."""
    stages = load_pipeline(path, overrides, out)
    rows = []
    for st in stages:
        rows.append({
            "name": st.name, "method": st.cfg.method.name, "config_file": st.config_file,
            "output_dir": str(st.output_dir), "status": status(st), "fingerprint": st.fingerprint,
            "reads": st.upstream, "overrides": st.applied, "dropped": st.dropped,
            "config": config_changes(st.cfg),
        })
    root = str(Path(stages[0].output_dir).parent)
    return {"pipeline": str(path), "output_dir": root, "warnings": precision_warnings(stages),
            "problems": input_problems(stages), "stages": rows}


def format_plan(p: dict) -> str:
    """The dry run as text, one block per stage."""
    lines = [f"pipeline {p['pipeline']}: {len(p['stages'])} stages under {p['output_dir']}"]
    lines += p["warnings"]
    for s in p["stages"]:
        lines.append("")
        lines.append(f"[{s['name']}] method {s['method']}" + (f", config {s['config_file']}" if s["config_file"] else ""))
        lines.append(f"  output:      {s['output_dir']}")
        lines.append(f"  status:      {_SAYS[s['status']]} (fingerprint {s['fingerprint']})")
        if s["reads"]:
            lines.append(f"  reads:       {', '.join(s['reads'])}")
        if s["overrides"]:
            lines.append(f"  overrides:   {' '.join(s['overrides'])}")
        if s["dropped"]:
            lines.append(f"  dropped:     {' '.join(s['dropped'])} (method {s['method']} does not use these keys: "
                         "not applied, so this stage's config and fingerprint are as without them)")
        lines.append("  config (differences from the defaults):")
        lines += [f"    {k}: {v}" for k, v in s["config"].items()]
    if p["problems"]:
        lines += ["", "a run would refuse to start:"] + [f"  {x}" for x in p["problems"]]
    return "\n".join(lines)
