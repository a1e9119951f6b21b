"""``aligndistil judge`` as a library function: check everything, answer, judge, report.

The order matters for what a failure leaves behind. Every input is checked first (the
question set, every model's tokenizer, the judge prompts, the judge server and its model
name), so a typo stops the run before anything is written. Then answers are generated
(cached per model), then judged (every request cached), and only at the very end are
``results.json``, ``results.md`` and ``win_rates.png`` written.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from aligndistil.workflows.judge.answers import AnswerSettings, answer_all, parse_model_spec, prepare_model
from aligndistil.workflows.judge.client import ChatClient, JudgeError
from aligndistil.workflows.judge.grading import (Judge, compare_by_reward, compare_pairwise, grade_single,
                                                 load_judge_prompts, reward_scores)
from aligndistil.workflows.judge.questions import load_questions
from aligndistil.workflows.judge.report import write_report
from aligndistil.workflows.judge.stats import length_controlled_win_rate, win_rate

__all__ = ["MODES", "run_judge"]

MODES = ("pairwise", "single", "both")


def _mean_ci(values: list[float]) -> dict:
    from aligndistil.workflows.evaluate import mean_ci95

    if not values:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    m, h = mean_ci95(values)
    return {"mean": m, "ci95": h, "n": len(values)}


def _pairwise_summary(records: list[dict]) -> dict:
    outcomes = [r["outcome"] for r in records]
    res = win_rate(outcomes)
    res["lc"] = length_controlled_win_rate(outcomes, [r["len_model"] - r["len_baseline"] for r in records])
    res["mean_len_model"] = sum(r["len_model"] for r in records) / len(records)
    res["mean_len_baseline"] = sum(r["len_baseline"] for r in records) / len(records)
    res["records"] = records
    return res


def _single_summary(records: list[dict], key: str = "score") -> dict:
    scores = [r[key] for r in records if r[key] is not None]
    res = _mean_ci(scores)
    res["unparsed"] = sum(1 for r in records if r[key] is None)
    turns = sorted({r["turn"] for r in records})
    res["per_turn"] = {str(t): _mean_ci([r[key] for r in records if r["turn"] == t and r[key] is not None])
                       for t in turns}
    res["records"] = records
    return res


def run_judge(models: list[str], out_dir: str | os.PathLike, *, baseline: str | None = None, mode: str = "pairwise",
              questions: str = "mtbench", max_questions: int | None = None, judge_base_url: str | None = None,
              judge_model: str | None = None, api_key_env: str = "OPENAI_API_KEY", answer_base_url: str | None = None,
              reward: str | None = None, tie_eps: float = 0.0, judge_prompts: str | None = None,
              concurrency: int = 4, max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
              parse_retries: int = 2, judge_max_tokens: int = 512, judge_temperature: float = 0.0,
              settings: AnswerSettings = AnswerSettings(), batch_size: int = 8,
              pipeline_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
              plots: bool = True, progress: bool = False, log=print) -> dict:
    """Answer ``questions`` with every model and judge them; write the report to ``out_dir``.

    Args:
        models: ``NAME=SPEC`` items (see :func:`~aligndistil.workflows.judge.answers.parse_model_spec`).
        baseline: the ``NAME=SPEC`` every model is compared with (pairwise modes).
        mode: ``pairwise``, ``single`` (1-10 grades; with ``reward``, mean rewards) or ``both``.
        judge_base_url, judge_model, api_key_env: the judge server, its model, the variable
            holding the key (not needed with ``reward``).
        reward: judge-free: a reward spec (``vader``, ``bt:<folder>``, ``module:function``).
        Others: see ``aligndistil judge --help``.

    Returns:
        The results dict also written to ``out_dir/results.json``.

    Raises:
        JudgeError, QuestionError, AnswerError, ModelLoadError: before anything is written,
            for bad input; JudgeError later for a server that stops answering (cached work
            stays on disk and a rerun continues from it).
    """
    if mode not in MODES:
        raise JudgeError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "single" and not baseline:
        raise JudgeError(f"mode {mode!r} compares against a baseline: pass --baseline NAME=SPEC")
    if not models:
        raise JudgeError("give at least one model to judge")
    if batch_size <= 0 or parse_retries < 0 or judge_max_tokens <= 0:
        raise JudgeError("batch size and judge max tokens must be > 0, parse retries >= 0")
    if reward is not None and (judge_base_url or judge_model):
        raise JudgeError("--reward judges without a server: drop --judge-base-url/--judge-model, or drop --reward "
                         "(api: models answer through --answer-base-url)")
    if reward is None and not (judge_base_url and judge_model):
        raise JudgeError("pass --judge-base-url and --judge-model (an OpenAI-compatible server), "
                         "or --reward for the judge-free win rates")

    # 1. Check every input; nothing is written yet.
    qs = load_questions(questions, max_questions)
    specs = [parse_model_spec(m, pipeline_dir) for m in models]
    base = parse_model_spec(baseline, pipeline_dir) if baseline else None
    names = [m.name for m in specs] + ([base.name] if base else [])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JudgeError(f"model name(s) {dup} given twice; name them NAME=SPEC")
    answer_url = answer_base_url or judge_base_url
    for m in specs + ([base] if base else []):
        prepare_model(m, settings, answer_url)
        log(f"[judge] {m.name}: {m.spec} ({m.kind}), chat template: {m.template}")
    if base and any(m.template != base.template for m in specs):
        log("[judge] note: the models do not all use the baseline's chat template; each answers with its own")
    cache = Path(cache_dir) if cache_dir is not None else Path(out_dir) / "cache"
    client_args = dict(api_key_env=api_key_env, cache_dir=cache, concurrency=concurrency, max_retries=max_retries,
                       timeout=timeout, backoff=backoff)
    judge = reward_fn = None
    if reward is not None:
        from aligndistil.rewards import get_reward

        reward_fn = get_reward(reward)
    else:
        prompts = load_judge_prompts(judge_prompts)
        judge = Judge(ChatClient(judge_base_url, judge_model, **client_args), prompts, parse_retries=parse_retries,
                      max_tokens=judge_max_tokens, temperature=judge_temperature)
        judge.client.check()
    api_clients = {}
    for m in specs + ([base] if base else []):
        if m.kind == "api":
            api_clients[m.name] = ChatClient(answer_url, m.source, **client_args)
            api_clients[m.name].check()

    # 2. Answers (cached per model; resumable).
    answers = {m.name: answer_all(m, qs, out_dir, settings, batch_size=batch_size, client=api_clients.get(m.name),
                                  progress=progress)
               for m in specs + ([base] if base else [])}

    # 3. Judging.
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": mode,
        "questions": {"source": str(questions), "n": len(qs), "turns": sum(len(q.turns) for q in qs)},
        "judge": ({"reward": reward, "tie_eps": tie_eps} if reward is not None else
                  {"base_url": judge_base_url, "model": judge_model, "api_key_env": api_key_env,
                   "prompts": str(judge_prompts or "built-in"), "temperature": judge_temperature,
                   "parse_retries": parse_retries}),
        "generation": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                       "top_p": settings.top_p, "seed": settings.seed, "use_chat_template": settings.use_chat_template},
        "models": {m.name: {"spec": m.spec, "kind": m.kind, "template": m.template, "fingerprint": m.fingerprint}
                   for m in specs + ([base] if base else [])},
        "baseline": base.name if base else None,
    }
    from tqdm.auto import tqdm

    if mode in ("pairwise", "both"):
        results["pairwise"] = {}
        for m in specs:
            if reward_fn is not None:
                recs = compare_by_reward(reward_fn, qs, answers[m.name], answers[base.name], tie_eps)
            else:
                with tqdm(total=2 * len(qs), desc=f"judge {m.name} vs {base.name}", disable=not progress,
                          dynamic_ncols=True) as bar:
                    recs = compare_pairwise(judge, qs, answers[m.name], answers[base.name],
                                            on_done=lambda: bar.update(1))
            results["pairwise"][m.name] = _pairwise_summary(recs)
    if mode in ("single", "both"):
        graded = specs + ([base] if base else [])
        results["single"] = {}
        if reward_fn is not None:
            for m in graded:
                sc = reward_scores(reward_fn, qs, answers[m.name])
                recs = [{"model": m.name, "question_id": q.qid, "turn": 1, "reward": sc[q.qid]} for q in qs]
                results["single"][m.name] = _single_summary(recs, key="reward")
        else:
            total = sum(len(q.turns) for q in qs) * len(graded)
            with tqdm(total=total, desc="grade", disable=not progress, dynamic_ncols=True) as bar:
                recs = grade_single(judge, qs, {m.name: answers[m.name] for m in graded},
                                    on_done=lambda: bar.update(1))
            for m in graded:
                results["single"][m.name] = _single_summary([r for r in recs if r["model"] == m.name])
    results["requests"] = {f"answers {n}": c.stats.as_dict() for n, c in api_clients.items()}
    if judge is not None:
        results["requests"]["judge"] = judge.client.stats.as_dict()

    # 4. Report, last.
    results["files"] = write_report(results, out_dir, plots=plots)
    return results
