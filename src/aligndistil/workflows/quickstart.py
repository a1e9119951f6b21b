"""The quickstart: the whole method, end to end, from one file and one command.

A quickstart file (``configs/pipelines/quickstart.yaml``, ``configs/pipelines/full.yaml``)
is a pipeline file (``output_dir``, ``base``, ``stages``; see :mod:`aligndistil.workflows.pipeline`)
with four more sections:

* ``reward``: the ground-truth reward spec that labels pairs and scores evaluation;
* ``prefs``: :func:`aligndistil.workflows.make_prefs.make_prefs` settings for the training pairs, sampled
  from ``base.model.policy`` (the initial model);
* ``heldout`` (optional): the same for held-out pairs (reward accuracy);
* ``reward_model`` (optional): :func:`aligndistil.rewards.bradley_terry.train_reward_model` settings;
  a Bradley-Terry reward model is then trained on the training pairs and its accuracy on
  the held-out pairs reported beside the DPO and contrastive rewards (AlignDistil Table 2);
* ``eval``: :func:`aligndistil.workflows.evaluate.evaluate` settings, with ``models`` (stage names, or
  ``initial`` for the initial model), ``dpo_stage`` and ``reverse_dpo_stage``.

:func:`run_quickstart` makes the pairs (skipped when already complete with the same
settings), writes the training part as ``output_dir/pipeline.yaml`` (every stage trains
on the pairs just made) and runs it with :func:`aligndistil.workflows.pipeline.run_pipeline` (stages
complete with the same fingerprint are skipped), then evaluates and prints the table. The
pair files are named after a hash of their settings, so changing how pairs are made
changes every stage's fingerprint and retrains.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import yaml

from aligndistil.config import ConfigError, load_yaml
from aligndistil.fileio import atomic_write_text
from aligndistil.workflows.pipeline import config_dirs

__all__ = ["QUICKSTART_KEYS", "default_config", "load_quickstart", "prefs", "run_quickstart", "write_pipeline"]

QUICKSTART_KEYS = ("output_dir", "reward", "prefs", "heldout", "reward_model", "eval", "base", "stages")
PREFS_KEYS = {"prompts", "max_prompts", "k", "max_new_tokens", "temperature", "top_p", "seed", "tie_threshold",
              "batch_size", "use_chat_template"}
RM_KEYS = {"steps", "epochs", "learning_rate", "batch_size", "max_length", "max_prompt_length", "seed"}
EVAL_KEYS = {"models", "dpo_stage", "reverse_dpo_stage", "prompts", "reward_model", "beta0", "max_new_tokens",
             "temperature", "top_p", "seed", "num_samples", "batch_size", "use_chat_template", "plots"}


def default_config(name: str = "quickstart") -> Path:
    """``pipelines/<name>.yaml`` in the pipeline's config folders (:func:`config_dirs`: the
    working directory's ``configs/``, then the source checkout's)."""
    rel = Path("pipelines") / f"{name}.yaml"
    for root in config_dirs():
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"configs/{rel} not found in the working directory or the source checkout; pass --config")


def _set_dotted(d: dict, dotted: str, raw: str, where: str) -> None:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; a number was meant
        try:
            value = float(value)
        except ValueError:
            pass
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{where}: {dotted} does not name a setting")
    cur[parts[-1]] = value


def load_quickstart(path: str | os.PathLike, overrides: list[str] | None = None, model: str | None = None,
                    output_dir: str | None = None) -> tuple[dict, list[str]]:
    """Read a quickstart file and apply overrides.

    ``prefs.KEY=V``, ``heldout.KEY=V``, ``eval.KEY=V`` and ``reward=V`` change those sections;
    ``model|data|train|method.KEY=V`` are passed on to every training stage whose method uses
    the key (as for ``aligndistil pipeline``; the others keep their settings and fingerprint). ``model`` replaces ``base.model.policy``.

    Returns:
        ``(spec, stage_overrides)``.
    """
    path = Path(path)
    spec = load_yaml(path)
    for key in spec:
        if key not in QUICKSTART_KEYS:
            raise ConfigError(f"{path}: unknown top-level key {key!r} (expected {', '.join(QUICKSTART_KEYS)})")
    for key in ("prefs", "eval", "stages"):
        if not spec.get(key):
            raise ConfigError(f"{path}: the section {key!r} is required")
    stage_overrides = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        head = dotted.split(".")[0]
        if head in ("prefs", "heldout", "eval", "reward_model") and "." in dotted:
            _set_dotted(spec, dotted, raw, f"override {item!r}")
        elif dotted == "reward":
            spec["reward"] = raw
        elif dotted == "output_dir":
            spec["output_dir"] = raw
        else:
            stage_overrides.append(item)
    if model:
        spec.setdefault("base", {}).setdefault("model", {})["policy"] = model
    if output_dir:
        spec["output_dir"] = output_dir
    policy = (spec.get("base") or {}).get("model", {}).get("policy")
    if not policy:
        raise ConfigError(f"{path}: base.model.policy (the initial model) is required")
    for sec, allowed in (("prefs", PREFS_KEYS), ("heldout", PREFS_KEYS), ("eval", EVAL_KEYS), ("reward_model", RM_KEYS)):
        unknown = set(spec.get(sec) or {}) - allowed
        if unknown:
            raise ConfigError(f"{path}: unknown keys in {sec}: {sorted(unknown)} (known: {sorted(allowed)})")
    names = [s.get("name") for s in spec["stages"] if isinstance(s, dict)]
    for m in spec["eval"].get("models") or []:
        if m != "initial" and m not in names:
            raise ConfigError(f"{path}: eval.models names {m!r}, which is neither 'initial' nor a stage ({names})")
    for k in ("dpo_stage", "reverse_dpo_stage"):
        if spec["eval"].get(k) and spec["eval"][k] not in names:
            raise ConfigError(f"{path}: eval.{k} = {spec['eval'][k]!r} is not a stage ({names})")
    spec["_source"] = str(path)
    return spec, stage_overrides


def prefs(spec: dict, section: str, out_dir: Path, policy: str, progress: bool, log) -> Path:
    """The pair file of ``spec[section]`` (``prefs`` or ``heldout``) under ``out_dir/data``: made
    by :func:`aligndistil.workflows.make_prefs.make_prefs`, or reused when already complete."""
    from aligndistil.workflows.make_prefs import PrefsSettings, _fingerprint, make_prefs

    p = dict(spec[section])
    prompts = p.pop("prompts", "sentiment:train" if section == "prefs" else "sentiment:test")
    settings = PrefsSettings(reward=spec.get("reward", "vader"), **p)
    # The file is named after what decides its content, so changed settings make a new file.
    fp = _fingerprint(settings.fingerprinted(policy, prompts))
    out = out_dir / "data" / f"{'train' if section == 'prefs' else 'heldout'}-{fp[:8]}.jsonl"
    make_prefs(policy, prompts, out, settings, progress=progress, skip_if_complete=True, log=log)
    return out


def write_pipeline(spec: dict, train_file: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the training part of a quickstart spec as a plain pipeline file (atomically).

    Every stage trains on ``train_file``; stage ``config`` paths are made absolute.
    """
    path = Path(path)
    src_dir = Path(spec["_source"]).resolve().parent
    stages = copy.deepcopy(spec["stages"])
    for st in stages:
        if isinstance(st, dict) and st.get("config"):
            st["config"] = str((src_dir / st["config"]).resolve())
    base = copy.deepcopy(spec.get("base") or {})
    base.setdefault("data", {})["train_file"] = str(train_file)
    pipe = {"output_dir": str(spec.get("output_dir") or "outputs/quickstart"), "base": base, "stages": stages}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "# Written by `aligndistil quickstart` from " + spec["_source"] + "\n"
                             + yaml.safe_dump(pipe, sort_keys=False))


def _reward_model(spec: dict, out_dir: Path, policy: str, train_pairs: Path, progress: bool, log) -> str:
    from aligndistil.rewards.bradley_terry import MARKER, train_reward_model

    settings = dict(spec["reward_model"])
    folder = out_dir / "reward_model"
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("pairs") == str(train_pairs) and info.get("quickstart_settings") == settings:
            log(f"[quickstart] reward model: complete in {folder}, skipped")
            return f"bt:{folder}"
    train_reward_model(policy, train_pairs, folder, progress=progress, log=log, **settings)
    info = json.loads(marker.read_text())
    info["quickstart_settings"] = settings
    atomic_write_text(marker, json.dumps(info, indent=2) + "\n")
    return f"bt:{folder}"


def run_quickstart(config: str | os.PathLike, overrides: list[str] | None = None, *, model: str | None = None,
                   output_dir: str | None = None, progress: bool = True, log=print) -> dict:
    """Make pairs, train every stage, evaluate; returns the evaluation results.

    Also writes ``output_dir/quickstart.json``: the time each phase took and where its
    outputs are.
    """
    from aligndistil.workflows.evaluate import EvalSettings, evaluate, format_table
    from aligndistil.workflows.pipeline import run_pipeline

    t_start = time.time()
    spec, stage_overrides = load_quickstart(config, overrides, model=model, output_dir=output_dir)
    if not progress:
        stage_overrides = ["train.progress_bar=false", *stage_overrides]
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out_dir = Path(spec.get("output_dir") or "outputs/quickstart")
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = spec["base"]["model"]["policy"]
    timings: dict[str, float] = {}

    t = time.time()
    from aligndistil.model.loading import resolve_model_path

    resolve_model_path(policy)  # converts the embedded model on first use (~40 s), timed apart
    timings["model"] = round(time.time() - t, 1)

    t = time.time()
    train_pairs = prefs(spec, "prefs", out_dir, policy, progress, log)
    timings["prefs"] = round(time.time() - t, 1)
    heldout_pairs = None
    if spec.get("heldout"):
        t = time.time()
        heldout_pairs = prefs(spec, "heldout", out_dir, policy, progress, log)
        timings["heldout_prefs"] = round(time.time() - t, 1)

    pipe_path = write_pipeline(spec, train_pairs, out_dir / "pipeline.yaml")
    t = time.time()
    outs = run_pipeline(pipe_path, stage_overrides, log=log)
    timings["train"] = round(time.time() - t, 1)
    folders = {Path(o).name: str(o) for o in outs}

    rm_spec = None
    if spec.get("reward_model"):
        t = time.time()
        rm_spec = _reward_model(spec, out_dir, policy, train_pairs, progress, log)
        timings["reward_model"] = round(time.time() - t, 1)

    ev = dict(spec["eval"])
    if rm_spec and not ev.get("reward_model"):
        ev["reward_model"] = rm_spec
    names = ev.pop("models", None) or ["initial"] + list(folders)
    models = {n: (policy if n == "initial" else folders[n]) for n in names}
    dpo_stage, rev_stage = ev.pop("dpo_stage", None), ev.pop("reverse_dpo_stage", None)
    eval_prompts = ev.pop("prompts", "sentiment:test")
    t = time.time()
    settings = EvalSettings(reference=policy, dpo_model=folders.get(dpo_stage) if dpo_stage else None,
                            reverse_dpo_model=folders.get(rev_stage) if rev_stage else None, prompts=eval_prompts,
                            reward=spec.get("reward", "vader"), pairs=str(heldout_pairs) if heldout_pairs else None,
                            runs=folders, **ev)
    res = evaluate(models, settings, out_dir=out_dir / "eval", progress=progress, log=log)
    timings["eval"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t_start, 1)
    summary = {"config": spec["_source"], "overrides": overrides or [], "timings_s": timings,
               "train_pairs": str(train_pairs), "heldout_pairs": str(heldout_pairs) if heldout_pairs else None,
               "pipeline": str(pipe_path), "eval": str(out_dir / "eval")}
    atomic_write_text(out_dir / "quickstart.json", json.dumps(summary, indent=2) + "\n")
    log("")
    log(format_table(res))
    log(f"[quickstart] done in {timings['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}); "
        f"report in {out_dir / 'eval'} (results.md, results.json, frontier.png, training_curves.png)")
    return res
