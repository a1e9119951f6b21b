"""AlignDistil's convergence study (Sec. 6.5, Fig. 2, App. E) on the built-in sentiment task.

The claim: token-level distributional optimisation (on-policy AlignDistil) converges faster
than token-level scalar optimisation (token-level REINFORCE, Eq. 43), which beats
sentence-level optimisation (sentence-level REINFORCE, Eq. 42). All three maximise the same
contrastive reward ``r_ctr(x, y) = beta0 log pi_dpo(y|x)/pi_rev(y|x)`` under a KL of weight
``beta`` to ``pi_dpo``; AlignDistil with the static ``alpha = beta0 / beta`` (the contrastive
teacher, Eq. 15, through ``method.teacher=constant``) distils its optimal policy in closed
form. The study trains the three from the same initial model, on the same prompts, with the
same batch, learning rate, number of steps and seeds, and compares the token-averaged
contrastive reward ``r_ctr / |y|`` of each step's own samples (Fig. 2's y-axis) and the
ground-truth VADER reward of the same samples.

:func:`run_convergence`:

1. the teachers: the quickstart's DPO and reverse-DPO models (``<quickstart output>/dpo``
   and ``reverse_dpo``) when both are finished runs, else trained exactly as the quickstart
   trains them (its pairs and its two stages, into the quickstart's folder, so a later
   quickstart reuses them; :func:`aligndistil.workflows.study_inputs.teachers`);
2. the prompts: the first ``max_prompts`` of the prompt set, as chat messages (the
   quickstart's pairs render prompts with the chat template too);
3. ``3 methods x seeds`` runs of the one trainer under ``<out>/runs/<method>-seed<k>``; a
   finished run (``COMPLETE.json`` of the same config) is skipped, an interrupted one resumed;
4. ``results.json``, ``results.md`` (the table), ``convergence.png`` (Fig. 2 style: mean over
   seeds, a band from the lowest to the highest seed) and ``vader.png``.

The table's "steps to reach" uses curves smoothed by a trailing mean over ``smooth`` steps:
a method reaches token-REINFORCE's final value (its smoothed value at the last step) at the
first step where its own smoothed seed-mean is at least that; "x faster" is token-REINFORCE's
step count over the method's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aligndistil.fileio import atomic_write_text
from aligndistil.workflows.study_inputs import StudyError, StudyInputs, teachers, tiny_inputs, train_run

__all__ = ["METHODS", "StudyError", "StudySettings", "TINY", "check_settings", "run_convergence", "summarise"]

#: name -> (label, method overrides); the study's reward metric and its ground truth.
METHODS = {
    "aligndistil": ("On-policy AlignDistil (static alpha)", {"name": "aligndistil", "mode": "on_policy",
                                                             "teacher": "constant"}),
    "reinforce_token": ("Token-level REINFORCE (Eq. 43)", {"name": "reinforce", "level": "token"}),
    "reinforce_sequence": ("Sentence-level REINFORCE (Eq. 42)", {"name": "reinforce", "level": "sequence"}),
}
REFERENCE = "reinforce_token"
METRIC, VADER = "reward/contrastive_per_token", "rollout/reward"


@dataclass
class StudySettings(StudyInputs):
    """What the study trains; every run shares all of it but the method and the seed.

    The first fields (output folder, quickstart config, policy and teachers) are :class:`StudyInputs`'.
    """

    out_dir: str = "outputs/convergence"
    prompts: str = "sentiment:train"
    max_prompts: int = 120  # steps x batch_size: every prompt is sampled once
    seeds: tuple = (0, 1)
    steps: int = 30  # ~10.5 s a step for SmolLM2-135M on 2 CPU cores: 6 runs in ~32 min
    batch_size: int = 4
    learning_rate: float = 2e-5
    max_new_tokens: int = 24
    max_length: int = 128
    max_prompt_length: int = 64
    temperature: float = 1.0
    beta: float = 0.08
    beta0: float = 0.1
    reward: str = "vader"
    smooth: int = 5
    tiny: bool = False
    extra: list = field(default_factory=list)  # section.key=value for every run


#: The test-sized study (``StudySettings(**TINY)``, ``--tiny``): the tiny random model, its synthetic
#: pairs and DPO / reverse-DPO teachers trained on them for 4 steps; seconds, machinery only.
TINY = dict(max_prompts=32, steps=6, batch_size=4, learning_rate=1e-3, max_new_tokens=8, max_length=64,
            max_prompt_length=48, smooth=2, tiny=True)


def _prompts(s: StudySettings, source: Path | None) -> list[str]:
    """The study's prompts: the first ``max_prompts`` of ``s.prompts`` (tiny: of the synthetic pairs)."""
    if source is not None:  # tiny: the prompts of the synthetic pairs
        prompts = list(dict.fromkeys(json.loads(x)["prompt"] for x in source.read_text().splitlines() if x.strip()))
        label = str(source)
    else:
        from aligndistil.data.prompt_sets import load_prompts

        prompts, label = load_prompts(s.prompts), f"--prompts {s.prompts}"
    prompts = prompts[: s.max_prompts]
    if len(prompts) < s.batch_size:
        raise StudyError(f"{label}: {len(prompts)} prompts (of at most --max-prompts {s.max_prompts}) are fewer "
                         f"than one batch of --batch-size {s.batch_size}")
    return prompts


def check_settings(s: StudySettings) -> None:
    """Refuse settings that cannot work, naming the option, before anything loads or is written:
    no seed, fewer than one step, non-positive sizes or learning rate, a prompt set smaller than a batch."""
    if not s.seeds:
        raise StudyError("--seeds: the study needs at least one seed")
    for flag, value in (("--steps", s.steps), ("--batch-size", s.batch_size), ("--max-new-tokens", s.max_new_tokens),
                        ("--max-prompts", s.max_prompts), ("--smooth", s.smooth)):
        if not isinstance(value, int) or value < 1:
            raise StudyError(f"{flag} must be a positive whole number, got {value!r}")
    for flag, value in (("--lr", s.learning_rate), ("--beta", s.beta)):
        if not value > 0:
            raise StudyError(f"{flag} must be > 0, got {value!r}")
    if not s.tiny:
        _prompts(s, None)
    for method in METHODS:  # every run's config, section.key=value overrides included, before any work
        run_config(s, method, s.seeds[0], "policy", "dpo", "reverse_dpo", Path(s.out_dir) / "prompts.jsonl")


def _prompt_file(s: StudySettings, source: Path | None) -> Path:
    """The study's prompts as ``{"prompt": [user message]}`` JSONL (the runs' train_file)."""
    prompts = _prompts(s, source)
    lines = [json.dumps({"prompt": [{"role": "user", "content": p}]}) for p in prompts]
    return atomic_write_text(Path(s.out_dir) / "prompts.jsonl", "\n".join(lines) + "\n")


def run_config(s: StudySettings, method: str, seed: int, policy: str, dpo: str, rev: str, prompts: Path,
               progress: bool = False):
    """The RunConfig of one run: ``method`` (a :data:`METHODS` key) with ``seed``."""
    from aligndistil.config import RunConfig, apply_overrides

    _, m = METHODS[method]
    method_opts = {**m, "beta": s.beta, "beta0": s.beta0, "max_new_tokens": s.max_new_tokens,
                   "temperature": s.temperature, "top_p": 1.0, "num_samples": 1, "log_reward": s.reward}
    if method == "aligndistil":
        method_opts["alpha"] = s.beta0 / s.beta  # the contrastive teacher: beta_t = beta0 / alpha = beta
    opts = [f"model.policy={policy}", f"model.dpo_model={dpo}", f"model.reverse_dpo_model={rev}",
            f"data.train_file={prompts}", f"data.max_length={s.max_length}",
            f"data.max_prompt_length={s.max_prompt_length}",
            f"train.output_dir={Path(s.out_dir) / 'runs' / f'{method}-seed{seed}'}", f"train.seed={seed}",
            f"train.learning_rate={s.learning_rate}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
            f"train.per_device_batch_size={s.batch_size}", f"train.max_steps={s.steps}", "train.logging_steps=1",
            f"train.progress_bar={str(progress).lower()}",
            *[f"method.{k}={v}" for k, v in method_opts.items()], *s.extra]
    return apply_overrides(RunConfig(), opts).validate()


# ----------------------------------------------------------------------------- analysis
def _smoothed(values: list[float], w: int) -> list[float]:
    return [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]


def _curves(runs: dict[str, list[Path]], key: str) -> dict[str, list[list[float]]]:
    """method -> one list of per-step values per seed (steps in order)."""
    from aligndistil.workflows.plots import read_metrics

    out = {}
    for method, folders in runs.items():
        per_seed = []
        for f in folders:
            recs = sorted(read_metrics(Path(f) / "metrics.jsonl"), key=lambda r: r["step"])
            per_seed.append([float(r[key]) for r in recs if key in r])
        out[method] = per_seed
    return out


def summarise(runs: dict[str, list[Path]], smooth: int) -> dict:
    """The table: final values and steps to reach token-REINFORCE's final token-averaged reward."""
    ctr, vader = _curves(runs, METRIC), _curves(runs, VADER)
    table = {}
    for method, per_seed in ctr.items():
        n = min(len(c) for c in per_seed)
        mean = [sum(c[i] for c in per_seed) / len(per_seed) for i in range(n)]
        v = [c for c in vader.get(method, []) if c]
        smoothed = _smoothed(mean, smooth)
        table[method] = {"label": METHODS[method][0], "steps": n, "mean_curve": mean, "smoothed_curve": smoothed,
                         "final": smoothed[-1], "final_per_seed": [_smoothed(c[:n], smooth)[-1] for c in per_seed],
                         "final_vader": (sum(_smoothed(c, smooth)[-1] for c in v) / len(v)) if v else None}
    target = table[REFERENCE]["final"]
    for row in table.values():
        reached = next((i + 1 for i, x in enumerate(row["smoothed_curve"]) if x >= target), None)
        row["steps_to_target"] = reached
    ref_steps = table[REFERENCE]["steps_to_target"]
    for row in table.values():
        row["x_faster"] = (ref_steps / row["steps_to_target"]) if row["steps_to_target"] else None
    return {"target": target, "reference": REFERENCE, "smooth": smooth, "methods": table}


def format_table(summary: dict) -> str:
    lines = [f"Target: token-REINFORCE's final token-averaged contrastive reward {summary['target']:+.4f} "
             f"(curves smoothed over {summary['smooth']} steps).", "",
             "| method | final r_ctr / len(y) (per seed) | final VADER | steps to reach target | x faster than token REINFORCE |",
             "|---|---|---|---|---|"]
    for row in summary["methods"].values():
        seeds = ", ".join(f"{x:+.4f}" for x in row["final_per_seed"])
        vader = "-" if row["final_vader"] is None else f"{row['final_vader']:+.3f}"
        reach = f"{row['steps_to_target']}" if row["steps_to_target"] else f"not within {row['steps']}"
        fast = f"{row['x_faster']:.2f}" if row["x_faster"] else f"< {summary['methods'][REFERENCE]['steps_to_target'] / row['steps']:.2f}"
        lines.append(f"| {row['label']} | {row['final']:+.4f} ({seeds}) | {vader} | {reach} | {fast} |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[Path]], key: str, ylabel: str, path: Path, title: str) -> Path:
    """Mean over seeds per step, a band from the lowest to the highest seed (AlignDistil Fig. 2's style)."""
    from aligndistil.workflows.plots import atomic_savefig, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, (method, per_seed) in enumerate(_curves(runs, key).items()):
        per_seed = [c for c in per_seed if c]
        if not per_seed:
            continue
        n = min(len(c) for c in per_seed)
        steps = list(range(1, n + 1))
        cols = [[c[i] for c in per_seed] for i in range(n)]
        ax.plot(steps, [sum(c) / len(c) for c in cols], color=f"C{j}", label=METHODS[method][0])
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=f"C{j}", alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def run_convergence(settings: StudySettings | None = None, *, progress: bool = True, log=print) -> dict:
    """Run (or finish) the study and write its table and plots; returns the summary."""
    s = settings or StudySettings()
    check_settings(s)
    started = time.time()
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if s.tiny:
        policy, dpo, rev, pairs = tiny_inputs(s.out_dir, s.beta0, log)
    else:
        (policy, dpo, rev), pairs = teachers(s, progress, log), None
    prompts = _prompt_file(s, pairs)
    runs: dict[str, list[Path]] = {}
    for method in METHODS:
        for seed in s.seeds:
            runs.setdefault(method, []).append(train_run(run_config(s, method, seed, policy, dpo, rev, prompts,
                                                                         progress), log))
    summary = summarise(runs, s.smooth)
    plot_curves(runs, METRIC, "token-averaged contrastive reward r_ctr(x,y)/|y|", out / "convergence.png",
                f"Convergence (beta = {s.beta}; {len(s.seeds)} seeds, band = min-max)")
    plot_curves(runs, VADER, f"{s.reward} reward of the step's samples", out / "vader.png",
                f"Ground-truth reward ({len(s.seeds)} seeds, band = min-max)")
    summary.update(settings={**asdict(s), "seeds": list(s.seeds)}, teachers={"policy": policy, "dpo": dpo,
                   "reverse_dpo": rev}, runs={m: [str(f) for f in fs] for m, fs in runs.items()},
                   seconds=round(time.time() - started, 1))
    table = format_table(summary)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", "# Convergence study (AlignDistil Fig. 2)\n\n" + table + "\n\n"
                      "![token-averaged contrastive reward](convergence.png)\n\n![VADER](vader.png)\n")
    log(table)
    log(f"[study] done in {summary['seconds']:.0f} s -> {out / 'results.md'}")
    return summary
