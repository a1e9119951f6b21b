"""The fidelity study: reward against KL for every method, and AlignDistil's Tables 2 and 3.

The papers' controlled claims are about MATCHED KL: TDPO Fig. 3 and SparsePO's frontier
(mean ground-truth reward against sequence KL to the reference, TDPO2 above DPO) and
AlignDistil Table 2 (the contrastive reward ``beta0 log pi_dpo/pi_rev`` ranks held-out pairs
more accurately than the DPO reward ``beta0 log pi_dpo/pi_ref``) and Table 3 (the
token-adaptive alpha of Eq. 16-17 against constant alphas). :func:`run_frontier` measures them
in miniature on the built-in sentiment task (VADER reward):

1. inputs: the quickstart's training pairs and its DPO / reverse-DPO models (reused when
   finished, else made exactly as the quickstart makes them; the studies' shared
   :mod:`aligndistil.workflows.study_inputs`), one set for every run;
2. the grid (:data:`DEFAULT_GRID`, :class:`FrontierSettings`): every method at 3 strengths
   and its seeds, trained by the one trainer under ``<out>/runs/<name>``; a finished run
   (``COMPLETE.json`` of the same config) is skipped, an interrupted one resumed;
3. each model evaluated by :func:`aligndistil.workflows.evaluate.evaluate` into
   ``<out>/evals/<name>`` (``point.json`` marks a point done): mean VADER reward with its 95%
   interval over prompts, the Monte-Carlo sequence KL to the reference and its tokenwise
   twin. The study CHECKS that the two KL estimates agree within their 95% intervals on every
   model (:func:`aligndistil.workflows.frontier_report.kl_agreement`) and lists violations;
4. Table 2: held-out pairs made from the held-out prompt split with several sampling seeds
   (the split has only 84 prompts, so a prompt gives up to one pair per seed), a
   Bradley-Terry reward model trained on the training pairs, and the accuracy of the three
   rewards with Wilson intervals and a paired bootstrap over prompts of contrastive - DPO;
5. ``results.json``, ``results.md`` (tables, rules in :mod:`.frontier_report`), ``frontier.png``.

The knobs. Every run trains for the same steps at the same learning rate (the quickstart's
budget: 12 steps of 4 pairs, lr 2e-5). For the DPO family the papers' knob is ``beta``, but the
pilot found that at this budget it hardly moves the KL (DPO: 0.54 nats at beta 0.3, 0.60 at
0.03), so the default grid varies the learning rate instead (SimPO, without a reference, keeps
``beta``); a grid file can set either. For AlignDistil it is the teacher's extrapolation: ``r`` of the adaptive teacher
(``alpha_t = r * TVD_t + eps``, Eq. 17), the constant ``alpha`` (Table 3's ablation) and the
vanilla teacher's ``beta`` (its ``alpha = beta0/beta - 1``, Eq. 11). These move the teacher
``z* = z_dpo + alpha (z_dpo - z_neg)`` itself: at ``r -> 0`` the teacher is the DPO model,
whose KL to the reference bounds the policy's; a larger ``r`` moves it further. A distilled
policy approaches its teacher within a few steps (the quickstart's AlignDistil reached about
9 times DPO's KL in 12 steps), so the teacher's distance, not the step budget, sets the KL;
changing steps or learning rate would instead change every method's budget and the
comparison with it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from aligndistil.errors import AlignDistilError
from aligndistil.fileio import atomic_write_text
from aligndistil.workflows.study_inputs import (StudyInputs, quickstart_spec, teachers, teachers_ready, tiny_inputs,
                                                train_run)

__all__ = ["METHODS", "DEFAULT_GRID", "FrontierError", "FrontierSettings", "RunSpec", "TINY", "load_settings",
           "plan", "format_plan", "run_frontier"]


class FrontierError(AlignDistilError, ValueError):
    """A bad study setting (an unknown method, an empty grid, a bad override); nothing was run."""


#: key -> (label, the method's fixed overrides). Strengths come from the grid.
METHODS: dict[str, tuple[str, dict]] = {
    "dpo": ("DPO", {"name": "dpo"}),
    "ipo": ("IPO", {"name": "ipo"}),
    "simpo": ("SimPO", {"name": "simpo"}),
    "tdpo1": ("TDPO1", {"name": "tdpo1"}),
    "tdpo2": ("TDPO2", {"name": "tdpo2", "alpha": 0.5}),
    "sparsepo": ("SparsePO", {"name": "sparsepo"}),
    "mapo": ("MaPO", {"name": "mapo"}),
    "aligndistil_off": ("AlignDistil off-policy (adaptive)", {"name": "aligndistil", "mode": "off_policy",
                                                              "teacher": "adaptive"}),
    "aligndistil_on": ("AlignDistil on-policy (adaptive)", {"name": "aligndistil", "mode": "on_policy",
                                                            "teacher": "adaptive", "temperature": 1.0}),
    "aligndistil_const": ("AlignDistil off-policy (constant alpha)", {"name": "aligndistil", "mode": "off_policy",
                                                                      "teacher": "constant"}),
    "aligndistil_vanilla": ("AlignDistil off-policy (vanilla teacher)", {"name": "aligndistil", "mode": "off_policy",
                                                                         "teacher": "vanilla"}),
}

#: method -> strengths, each a dict of ``section.key: value`` overrides (weakest first).
DEFAULT_GRID: dict[str, list[dict]] = {
    # The pilot (docs/frontier-study.md) found beta moves DPO's KL by 0.06 nats over a 10x range
    # at this budget, so the DPO family's knob is the learning rate (beta at its default 0.1).
    "dpo": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    "ipo": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    "simpo": [{"method.beta": 1.0, "method.gamma": 0.5}, {"method.beta": 2.0, "method.gamma": 1.0},
              {"method.beta": 4.0, "method.gamma": 2.0}],
    "tdpo1": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    "tdpo2": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    "sparsepo": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    "mapo": [{"train.learning_rate": 2e-5}, {"train.learning_rate": 4e-5}, {"train.learning_rate": 8e-5}],
    # AlignDistil: r = 1 already reached 1.34 nats in the pilot (r = 10: 5.16 in the quickstart).
    "aligndistil_off": [{"method.r": 0.3}, {"method.r": 1.0}, {"method.r": 3.0}],
    "aligndistil_on": [{"method.r": 0.3}, {"method.r": 1.0}, {"method.r": 3.0}],
    "aligndistil_const": [{"method.alpha": 0.1}, {"method.alpha": 0.3}, {"method.alpha": 1.0}],
    "aligndistil_vanilla": [{"method.beta": 0.0667}, {"method.beta": 0.05}, {"method.beta": 0.0333}],
}
MULTI_SEED = ("dpo", "tdpo2", "sparsepo", "aligndistil_off", "aligndistil_on")
TABLE3 = ("aligndistil_off", "aligndistil_const")

#: Planning figures on the 2-core CPU (SmolLM2-135M, fp32): seconds per training step of
#: 4 pairs (one 12-step run ~60 s), the on-policy factor (it samples 24 tokens per prompt
#: first), one evaluation at 84 prompts x 24 tokens, and the fixed parts.
SEC_PER_STEP, ON_POLICY_FACTOR, EVAL_SEC = 5.0, 1.6, 27.0
FIXED_SEC = {"teachers (if missing)": 260.0, "held-out pairs": 60.0, "reward model": 60.0, "Table 2 scoring": 40.0}


@dataclass
class FrontierSettings(StudyInputs):
    """What the study trains and measures; every run shares all of it but method, strength and seed.

    The first fields (output folder, quickstart config, policy and teachers) are :class:`StudyInputs`'.
    """

    out_dir: str = "outputs/frontier"
    train_file: str | None = None  # default: the quickstart's training pairs
    grid: dict = field(default_factory=lambda: {k: [dict(s) for s in v] for k, v in DEFAULT_GRID.items()})
    seeds: tuple = (0, 1)
    multi_seed: tuple = MULTI_SEED  # methods trained with every seed; the others with seeds[0]
    only: tuple = ()  # pilot: these methods only
    max_runs: int | None = None  # pilot: the first N runs of the plan only
    steps: int = 12
    batch_size: int = 4
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_prompt_length: int = 64
    beta0: float = 0.1
    reward: str = "vader"
    eval_prompts: str = "sentiment:test"
    eval_max_prompts: int | None = None
    max_new_tokens: int = 24
    num_samples: int = 1  # samples per prompt (the reward interval is over prompts)
    eval_seed: int = 1234
    eval_batch_size: int = 84
    kl_values: tuple = ()  # fixed KL values of the table; () = 25/50/75% of the common range
    table2: bool = True
    heldout_seeds: tuple = (1, 2, 3, 4)  # one make-prefs pass over the held-out prompts per seed
    heldout_k: int = 2
    rm_steps: int = 14  # 2 epochs of the quickstart's ~55 training pairs at 8 a step
    tiny: bool = False
    extra: list = field(default_factory=list)  # section.key=value for every run


#: The test-sized study: the tiny random model, its synthetic pairs and teachers (study_inputs.tiny_inputs),
#: 1 step a run, 8 prompts x 6 tokens; seconds, machinery only.
TINY = dict(steps=1, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, max_length=64, max_prompt_length=32,
            max_new_tokens=6, eval_max_prompts=8, eval_batch_size=8, rm_steps=2, tiny=True)


class RunSpec(NamedTuple):
    method: str
    strength_index: int
    strength: str  # its label, e.g. "beta=0.1"
    overrides: dict
    seed: int
    name: str


def _label(overrides: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def load_settings(path: str | None, **given) -> FrontierSettings:
    """Settings from a YAML file of :class:`FrontierSettings` fields (optional), then ``given``
    (None values are ignored); checked, so a typo fails before any work."""
    from aligndistil.config import load_yaml

    data = load_yaml(path) if path else {}
    names = {f.name for f in dataclasses.fields(FrontierSettings)}
    for key in data:
        if key not in names:
            raise FrontierError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(names))})")
    base = {**(TINY if (given.get("tiny") or data.get("tiny")) else {}), **data,
            **{k: v for k, v in given.items() if v is not None}}
    for key in ("seeds", "multi_seed", "only", "kl_values", "heldout_seeds"):
        if key in base:
            base[key] = tuple(base[key])
    s = FrontierSettings(**base)
    plan(s)  # checks the grid and every run's config
    return s


def plan(s: FrontierSettings) -> list[RunSpec]:
    """Every run of the study in order (method, strength, seed), after ``only`` and ``max_runs``.

    Raises:
        FrontierError: an unknown method, an empty strength list, a bad override or seed list.
    """
    from aligndistil.config import apply_overrides, RunConfig

    if not s.seeds:
        raise FrontierError("the study needs at least one seed")
    for m in [*s.grid, *s.only]:
        if m not in METHODS:
            raise FrontierError(f"unknown method {m!r} in the grid or --only (known: {', '.join(METHODS)})")
    runs = []
    for m, strengths in s.grid.items():
        if s.only and m not in s.only:
            continue
        if not strengths:
            raise FrontierError(f"method {m!r} has no strengths in the grid")
        for i, ov in enumerate(strengths):
            if not isinstance(ov, dict) or not ov:
                raise FrontierError(f"grid[{m!r}][{i}] must be a non-empty mapping of section.key: value")
            try:  # the overrides must make a valid config: checked now, not at run 30
                apply_overrides(RunConfig(), [f"{k}={v}" for k, v in ov.items()] + list(s.extra)).validate()
            except AlignDistilError as e:
                raise FrontierError(f"grid[{m!r}][{i}]: {e}") from None
            for seed in (s.seeds if m in s.multi_seed else s.seeds[:1]):
                slug = "_".join(f"{k.split('.')[-1]}{v}" for k, v in ov.items())
                runs.append(RunSpec(m, i, _label(ov), dict(ov), seed, f"{m}-{slug}-seed{seed}"))
    if s.max_runs is not None:
        runs = runs[: s.max_runs]
    if not runs:
        raise FrontierError("the plan is empty (check --only and --max-runs)")
    return runs


def _estimate(s: FrontierSettings, runs: list[RunSpec]) -> tuple[float, dict]:
    n_prompts = s.eval_max_prompts or 84
    ev = EVAL_SEC * n_prompts / 84 * s.num_samples * s.max_new_tokens / 24
    per = {r.name: s.steps * SEC_PER_STEP * s.batch_size / 4 * (ON_POLICY_FACTOR if r.method == "aligndistil_on" else 1)
           + ev for r in runs}
    fixed = dict(FIXED_SEC) if s.table2 else {"teachers (if missing)": FIXED_SEC["teachers (if missing)"]}
    if _teachers_ready(s):
        fixed.pop("teachers (if missing)")
    fixed["initial model eval"] = ev
    # Runs evaluated already (a point.json exists) cost nothing again; a stale one is counted as done.
    todo = {n: v for n, v in per.items() if not (Path(s.out_dir) / "evals" / n / "point.json").is_file()}
    return sum(todo.values()) + sum(fixed.values()), {"runs": per, "todo": todo, "fixed": fixed}


def _teachers_ready(s: FrontierSettings) -> bool:
    """True when the DPO and reverse-DPO models are given or the quickstart's are finished."""
    if s.tiny:
        return bool(s.dpo_model)
    return teachers_ready(s)


def format_plan(s: FrontierSettings) -> str:
    """The grid, the runs and the estimated time (planning figures, not measurements)."""
    runs = plan(s)
    total, parts = _estimate(s, runs)
    lines = [f"Frontier study plan: {len(runs)} runs of {s.steps} steps x {s.batch_size} pairs (lr {s.learning_rate}), "
             f"each evaluated on {s.eval_max_prompts or 'all'} prompts of {s.eval_prompts} x {s.num_samples} sample(s) "
             f"x {s.max_new_tokens} tokens.", ""]
    for m in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == m]
        strengths = list(dict.fromkeys(r.strength for r in mine))
        seeds = sorted({r.seed for r in mine})
        lines.append(f"  {m:20s} {len(mine):2d} runs  seeds {seeds}  strengths: {' | '.join(strengths)}")
    lines += ["", "Fixed parts: " + ", ".join(f"{k} ~{v:.0f} s" for k, v in parts["fixed"].items()),
              f"Estimated time: ~{total / 60:.0f} min for the {len(parts['todo'])} runs not yet evaluated in "
              f"{s.out_dir} (planning figures, not measurements: {SEC_PER_STEP:.0f} s a training step, "
              f"x{ON_POLICY_FACTOR} on-policy, {EVAL_SEC:.0f} s an eval at 84 prompts x 24 tokens)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs
def _inputs(s: FrontierSettings, progress: bool, log) -> tuple[str, str, str, Path]:
    """``(policy, dpo, reverse_dpo, training pairs)``: the quickstart's, or the tiny workspace's."""
    if s.tiny:
        policy, dpo, rev, pairs = tiny_inputs(s.out_dir, s.beta0, log)
        return policy, dpo, rev, Path(s.train_file or pairs)
    policy, dpo, rev = teachers(s, progress, log)
    if s.train_file:
        return policy, dpo, rev, Path(s.train_file)
    from aligndistil.workflows.quickstart import prefs

    spec, qs = quickstart_spec(s)
    return policy, dpo, rev, prefs(spec, "prefs", qs, spec["base"]["model"]["policy"], progress, log)


def run_config(s: FrontierSettings, r: RunSpec, policy: str, dpo: str, rev: str, pairs: Path, progress: bool = False):
    """The RunConfig of one run of the plan."""
    from aligndistil.config import RunConfig, apply_overrides

    method = {**METHODS[r.method][1], "beta0": s.beta0}
    if r.method == "aligndistil_on":
        method.update(max_new_tokens=s.max_new_tokens, log_reward=s.reward)
    opts = [f"model.policy={policy}", f"model.dpo_model={dpo}", f"model.reverse_dpo_model={rev}",
            f"data.train_file={pairs}", f"data.max_length={s.max_length}",
            f"data.max_prompt_length={s.max_prompt_length}",
            f"train.output_dir={Path(s.out_dir) / 'runs' / r.name}", f"train.seed={r.seed}",
            f"train.learning_rate={s.learning_rate}", f"train.warmup_ratio={s.warmup_ratio}",
            f"train.per_device_batch_size={s.batch_size}", f"train.max_steps={s.steps}", "train.logging_steps=1",
            f"train.progress_bar={str(progress).lower()}", *[f"method.{k}={v}" for k, v in method.items()],
            *[f"{k}={v}" for k, v in r.overrides.items()], *s.extra]
    return apply_overrides(RunConfig(), opts).validate()


def _eval_prompts(s: FrontierSettings, pairs: Path) -> list[str] | str:
    if s.tiny:  # the tiny tokenizer knows only the synthetic pairs' characters
        prompts = list(dict.fromkeys(json.loads(x)["prompt"] for x in pairs.read_text().splitlines() if x.strip()))
    else:
        from aligndistil.data.prompt_sets import load_prompts

        prompts = load_prompts(s.eval_prompts)
    return prompts[: s.eval_max_prompts] if s.eval_max_prompts else prompts


def _point(s: FrontierSettings, name: str, model: str, key: str, policy: str, prompts: list[str], progress: bool,
           log) -> dict:
    """Evaluate one model into ``<out>/evals/<name>`` (skipped when ``point.json`` has the same key)."""
    from aligndistil.workflows.evaluate import EvalSettings, evaluate
    from aligndistil.workflows.frontier_report import point_from_samples

    folder = Path(s.out_dir) / "evals" / name
    marker = folder / "point.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            log(f"[frontier] eval {name}: complete, skipped")
            return done["point"]
    es = EvalSettings(reference=policy, prompts=prompts, reward=s.reward, max_new_tokens=s.max_new_tokens,
                      num_samples=s.num_samples, seed=s.eval_seed, batch_size=s.eval_batch_size, plots=False)
    evaluate({name: model}, es, out_dir=folder, progress=progress, log=log)
    records = [json.loads(x) for x in (folder / "samples" / f"{name}.jsonl").read_text().splitlines() if x.strip()]
    point = point_from_samples(records)
    atomic_write_text(marker, json.dumps({"key": key, "point": point}, indent=2) + "\n")
    return point


def _seconds(path: Path) -> float | None:
    """The ``seconds`` a finished run (COMPLETE.json) or evaluation (results.json) recorded."""
    try:
        return json.loads(path.read_text()).get("seconds")
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the study
def run_frontier(settings: FrontierSettings | None = None, *, progress: bool = True, log=print) -> dict:
    """Run (or finish) the study and write results.json, results.md and frontier.png; returns the summary."""
    from aligndistil.workflows import frontier_report as R
    from aligndistil.workflows.frontier_table2 import run_table2

    s = settings or FrontierSettings()
    runs = plan(s)  # every setting checked before any work
    started = time.time()
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy, dpo, rev, pairs = _inputs(s, progress, log)
    prompts = _eval_prompts(s, pairs)
    ekey = json.dumps({"prompts": prompts, "reward": s.reward, "tokens": s.max_new_tokens, "n": s.num_samples,
                       "seed": s.eval_seed, "reference": policy}, sort_keys=True)
    initial = _point(s, "initial", policy, ekey, policy, prompts, progress, log)
    points = []
    for r in runs:
        cfg = run_config(s, r, policy, dpo, rev, pairs, progress)
        folder = train_run(cfg, log)
        p = _point(s, r.name, str(folder), f"{cfg.fingerprint()}|{ekey}", policy, prompts, progress, log)
        points.append({"method": r.method, "strength": r.strength, "strength_index": r.strength_index,
                       "seed": r.seed, "run": r.name, **p, "train_seconds": _seconds(folder / "COMPLETE.json"),
                       "eval_seconds": _seconds(out / "evals" / r.name / "results.json")})
        log(f"[frontier] {r.name}: reward {p['reward']:+.3f} ± {p['reward_ci95']:.3f}, KL {p['kl']:.2f} "
            f"(tokenwise {p['kl_tokenwise']:.2f}){'' if p['kl_check']['agree'] else '  KL CHECK FAILED'}")
    kl_values, rng, common = (list(s.kl_values), None, None) if s.kl_values else R.fixed_kl_values(points)
    table = R.frontier_table(points, kl_values)
    labels = {m: METHODS[m][0] for m in METHODS}
    violations = [p["run"] for p in points if not p["kl_check"]["agree"]]
    if not initial["kl_check"]["agree"]:
        violations.insert(0, "initial")
    t2 = run_table2(s, policy, dpo, rev, pairs, progress, log) if s.table2 else None
    t3 = [{"label": labels[m], "method": m, "strength": st["strength"], "n_seeds": len(st["seeds"]),
           "reward": st["reward"], "reward_ci95": st["reward_ci95"], "kl": st["kl"]}
          for m in TABLE3 if m in table for st in table[m]["strengths"]]
    R.plot_study_frontier(points, labels, out / "frontier.png", initial, kl_values,
                          f"Reward vs KL ({s.steps} steps, {len(prompts)} prompts x {s.num_samples})")
    summary = {"settings": {**asdict(s), "grid": s.grid}, "teachers": {"policy": policy, "dpo": dpo, "reverse_dpo": rev},
               "train_pairs": str(pairs), "n_prompts": len(prompts), "samples_per_prompt": s.num_samples,
               "initial": initial, "points": points, "kl_values": kl_values,
               "kl_range": list(rng) if rng else None, "common_range": common, "table": table,
               "kl_check": {"n_models": len(points) + 1, "violations": violations}, "table2": t2, "table3": t3,
               "seconds": round(time.time() - started, 1)}
    md = _report(s, summary, labels, len(prompts))
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    log(md)
    log(f"[frontier] done in {summary['seconds']:.0f} s -> {out / 'results.md'}")
    return summary


def _report(s: FrontierSettings, summary: dict, labels: dict, n_prompts: int) -> str:
    from aligndistil.workflows import frontier_report as R

    ini = summary["initial"]
    rng = summary["kl_range"]
    where = ("given" if rng is None else f"{'common range' if summary['common_range'] else 'NO common range; median range'}"
             f" [{rng[0]:.2f}, {rng[1]:.2f}]")
    v = summary["kl_check"]["violations"]
    parts = ["# Reward against KL (frontier study)", "",
             f"Every model: {s.steps} steps x {s.batch_size} pairs, lr {s.learning_rate}; evaluated on {n_prompts} "
             f"prompts of `{'the tiny pairs' if s.tiny else s.eval_prompts}` x {s.num_samples} sample(s) per prompt, {s.max_new_tokens} new tokens, "
             f"T=1, seed {s.eval_seed}; reward `{s.reward}`, intervals over prompts. Initial model: reward "
             f"{ini['reward']:+.3f} ± {ini['reward_ci95']:.3f}. Fixed KL values: {where}.", "",
             R.format_frontier(summary["table"], summary["kl_values"], labels), "",
             "## KL check (Monte-Carlo against tokenwise)", "",
             (f"All {summary['kl_check']['n_models']} models: the two estimates' 95% intervals overlap." if not v else
              f"{len(v)} of {summary['kl_check']['n_models']} models FAIL (intervals do not overlap): {', '.join(v)}."),
             "", "![frontier](frontier.png)"]
    tr = [p["train_seconds"] for p in summary["points"] if p.get("train_seconds") is not None]
    ev = [p["eval_seconds"] for p in summary["points"] if p.get("eval_seconds") is not None]
    if tr and ev:  # as recorded by each run and evaluation, whenever it ran
        parts[3:3] = ["", f"Measured cost: training {sum(tr):.0f} s over {len(tr)} runs (mean {sum(tr) / len(tr):.0f} s), "
                      f"evaluation {sum(ev):.0f} s (mean {sum(ev) / len(ev):.0f} s); this invocation "
                      f"{summary['seconds']:.0f} s."]
    if summary["table2"]:
        parts += ["", "## Table 2 in miniature (reward accuracy)", "", R.format_table2(summary["table2"])]
    if summary["table3"]:
        parts += ["", "## Table 3 in miniature (adaptive against constant alpha)", "", R.format_table3(summary["table3"])]
    return "\n".join(parts) + "\n"
