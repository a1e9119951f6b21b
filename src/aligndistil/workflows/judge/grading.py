"""Single-answer grading and pairwise comparison by an LLM judge, and the judge-free pairing.

Both follow MT-Bench ("Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", Sec. 3.1):

* single-answer grading: the judge grades each turn's answer from 1 to 10; turn ``t > 1``
  is graded with the conversation before it as context; questions with reference answers
  (math, reasoning, coding in MT-Bench) are graded against them;
* pairwise comparison against a baseline: each pair is judged twice, once with the model's
  answer shown first and once with the baseline's first, to cancel the judge's position
  bias (Sec. 3.3). The outcome counts as a win or a loss only when both orders agree;
  otherwise (or when both say tie) it is a tie.

A reply without a verdict in the required form is asked again with a reminder (a new
request, so it does not hit the cache of the failed one); if it still has none the
judgment is ``None``: counted and reported as unparsed, never scored as a loss.

The judge-free fallback pairs the same answers under a reward (VADER, a Bradley-Terry
reward model, any ``module:function``) instead: the higher mean reward over the turns wins,
a difference within ``tie_eps`` is a tie.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

import yaml

from aligndistil.workflows.judge.client import JudgeError
from aligndistil.workflows.judge.questions import Question
from aligndistil.workflows.judge.stats import OUTCOME

__all__ = ["PROMPT_FIELDS", "Judge", "compare_by_reward", "compare_pairwise", "default_prompts_path",
           "grade_single", "load_judge_prompts", "parse_rating", "parse_verdict"]

#: Every template of a prompts file and the fields it must use (no others are allowed).
PROMPT_FIELDS: dict[str, set[str]] = {
    "single_system": set(), "pair_system": set(), "single_reminder": set(), "pair_reminder": set(),
    "single": {"question", "answer"},
    "single_ref": {"question", "reference", "answer"},
    "single_multi": {"conversation", "turn"},
    "single_multi_ref": {"conversation", "reference", "turn"},
    "pair": {"question", "answer_a", "answer_b"},
    "pair_ref": {"question", "reference", "answer_a", "answer_b"},
    "pair_multi": {"conversation_a", "conversation_b"},
    "pair_multi_ref": {"conversation_a", "conversation_b", "reference"},
}


def default_prompts_path():
    """The shipped prompts file (a ``Traversable``); copy it to write your own."""
    return resources.files("aligndistil.workflows.judge").joinpath("prompts", "default.yaml")


def load_judge_prompts(path: str | Path | None = None) -> dict[str, str]:
    """Read and check a prompts file (default: the shipped one).

    Raises:
        JudgeError: unreadable, not a mapping, a key missing or unknown, or a template
            that lacks a required field or names one it cannot get.
    """
    src = default_prompts_path() if path is None else Path(path)
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise JudgeError(f"cannot read judge prompts {src}: {exc}") from None
    if not isinstance(data, dict):
        raise JudgeError(f"judge prompts {src}: expected a mapping of template names to text")
    unknown = sorted(set(data) - set(PROMPT_FIELDS))
    if unknown:
        raise JudgeError(f"judge prompts {src}: unknown key(s) {unknown} (expected {sorted(PROMPT_FIELDS)})")
    for key, fields in PROMPT_FIELDS.items():
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise JudgeError(f"judge prompts {src}: key {key!r} is missing or empty")
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(data[key]) if f is not None}
        except ValueError as exc:
            raise JudgeError(f"judge prompts {src}, {key!r}: bad braces ({exc}); write a literal brace as {{{{ or }}}}") from None
        if used - fields:
            raise JudgeError(f"judge prompts {src}, {key!r}: unknown field(s) {sorted(used - fields)}; "
                             f"it may use {sorted(fields)}")
        if fields - used:
            raise JudgeError(f"judge prompts {src}, {key!r}: must use the field(s) {sorted(fields - used)}")
    return {k: data[k].strip() for k in PROMPT_FIELDS}


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_LOOSE = re.compile(r"[Rr]ating\s*:?\s*\[*\s*(\d+(?:\.\d+)?)")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The last ``[[N]]`` (else ``Rating: N``) in ``text`` with 1 <= N <= 10, or ``None``."""
    for pattern in (_RATING, _RATING_LOOSE):
        found = pattern.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie) from the last ``[[X]]`` in ``text``, or ``None``."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


def _conversation(q: Question, answers: list[str], upto: int) -> str:
    parts = []
    for t in range(upto + 1):
        parts.append(f"### Turn {t + 1}\n[User]\n{q.turns[t]}\n\n[Assistant]\n{answers[t]}")
    return "\n\n".join(parts)


def _reference(q: Question, turn: int) -> str | None:
    """The reference answer of one turn, or ``None`` (none given, or left empty)."""
    if not q.reference or turn >= len(q.reference) or not q.reference[turn].strip():
        return None
    return q.reference[turn]


def _references(q: Question, upto: int) -> str | None:
    """The reference answers of turns ``0..upto``, one line each, or ``None`` if none has one."""
    refs = [f"Turn {t + 1}: {_reference(q, t)}" for t in range(upto + 1) if _reference(q, t)]
    return "\n".join(refs) if refs else None


class Judge:
    """An LLM judge: a :class:`ChatClient`, the prompts and how to ask.

    Args:
        client: the judge's chat client.
        prompts: from :func:`load_judge_prompts`.
        parse_retries: times a reply without a verdict is asked again.
        max_tokens, temperature: the judge's generation settings (temperature 0 makes the
            verdicts reproducible where the server is deterministic).
    """

    def __init__(self, client, prompts: dict[str, str], *, parse_retries: int = 2, max_tokens: int = 512,
                 temperature: float = 0.0):
        self.client, self.prompts = client, prompts
        self.parse_retries, self.max_tokens, self.temperature = parse_retries, max_tokens, temperature

    def ask(self, kind: str, user: str, parse) -> tuple[object, int]:
        """``(verdict or None, attempts)`` for one judgment; ``kind`` is single or pair."""
        msgs = [{"role": "system", "content": self.prompts[f"{kind}_system"]}, {"role": "user", "content": user}]
        for attempt in range(self.parse_retries + 1):
            reply = self.client.complete(msgs, temperature=self.temperature, max_tokens=self.max_tokens)
            verdict = parse(reply)
            if verdict is not None:
                return verdict, attempt + 1
            msgs = msgs + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": self.prompts[f"{kind}_reminder"]}]
        return None, self.parse_retries + 1


def grade_single(judge: Judge, questions: list[Question], answers: dict[str, dict[str, list[str]]],
                 on_done=None) -> list[dict]:
    """Grade every turn of every model's answers: one record per (model, question, turn)
    with ``score`` (1-10, or ``None`` if unparsed) and ``attempts``."""
    jobs = []
    p = judge.prompts
    for name, ans in answers.items():
        for q in questions:
            for t in range(len(q.turns)):
                if t == 0:
                    fields = {"question": q.turns[0], "answer": ans[q.qid][0]}
                    tpl = "single"
                    if _reference(q, 0):
                        fields["reference"], tpl = _reference(q, 0), "single_ref"
                else:
                    # A later turn is graded with all references up to it: the earlier ones
                    # are context, as the conversation is.
                    ref = _references(q, t)
                    fields = {"conversation": _conversation(q, ans[q.qid], t), "turn": t + 1}
                    tpl = "single_multi"
                    if ref:
                        fields["reference"], tpl = ref, "single_multi_ref"
                jobs.append((name, q, t, p[tpl].format(**fields)))

    def run(job):
        name, q, t, text = job
        score, attempts = judge.ask("single", text, parse_rating)
        return {"model": name, "question_id": q.qid, "category": q.category, "turn": t + 1, "score": score,
                "attempts": attempts}

    return judge.client.map(run, jobs, on_done=on_done)


def _pair_text(p: dict, q: Question, first: list[str], second: list[str]) -> str:
    last = len(q.turns) - 1
    ref = _references(q, last)
    if last == 0:
        fields = {"question": q.turns[0], "answer_a": first[0], "answer_b": second[0]}
        if ref:
            fields["reference"] = _reference(q, 0)
        return p["pair_ref" if ref else "pair"].format(**fields)
    fields = {"conversation_a": _conversation(q, first, last), "conversation_b": _conversation(q, second, last)}
    if ref:
        fields["reference"] = ref
    return p["pair_multi_ref" if ref else "pair_multi"].format(**fields)


def _combine(v_model_first: str | None, v_base_first: str | None) -> float | None:
    # Both orders must agree for a win or a loss; any disagreement is a tie.
    if v_model_first is None or v_base_first is None:
        return None
    return OUTCOME[v_model_first] if v_model_first == v_base_first else OUTCOME["tie"]


def _length(texts: list[str]) -> int:
    return sum(len(t) for t in texts)


def compare_pairwise(judge: Judge, questions: list[Question], model_answers: dict[str, list[str]],
                     baseline_answers: dict[str, list[str]], on_done=None) -> list[dict]:
    """Judge the model against the baseline on every question, in both orders.

    Returns one record per question: ``verdicts`` (``model_first`` / ``baseline_first``,
    each ``win`` / ``loss`` / ``tie`` from the model's side, or ``None``), ``outcome``
    (1 / 0.5 / 0 / ``None``), ``attempts`` and the answers' lengths in characters.
    """
    seen = {"A": "win", "B": "loss", "C": "tie"}        # model shown as A
    flipped = {"A": "loss", "B": "win", "C": "tie"}     # baseline shown as A
    jobs = []
    for q in questions:
        m, b = model_answers[q.qid], baseline_answers[q.qid]
        jobs.append((q, "model_first", _pair_text(judge.prompts, q, m, b), seen))
        jobs.append((q, "baseline_first", _pair_text(judge.prompts, q, b, m), flipped))

    def run(job):
        _, _, text, mapping = job
        letter, attempts = judge.ask("pair", text, parse_verdict)
        return (mapping[letter] if letter else None), attempts

    res = judge.client.map(run, jobs, on_done=on_done)
    out = []
    for i, q in enumerate(questions):
        (v1, a1), (v2, a2) = res[2 * i], res[2 * i + 1]
        out.append({"question_id": q.qid, "category": q.category,
                    "verdicts": {"model_first": v1, "baseline_first": v2}, "attempts": a1 + a2,
                    "outcome": _combine(v1, v2), "len_model": _length(model_answers[q.qid]),
                    "len_baseline": _length(baseline_answers[q.qid])})
    return out


def reward_scores(reward, questions: list[Question], answers: dict[str, list[str]]) -> dict[str, float]:
    """Each question's mean reward over its turns (the reward sees each turn's user message)."""
    prompts = [q.turns[t] for q in questions for t in range(len(q.turns))]
    responses = [answers[q.qid][t] for q in questions for t in range(len(q.turns))]
    scores = iter(reward(prompts, responses))
    out = {}
    for q in questions:
        vals = [next(scores) for _ in q.turns]
        out[q.qid] = sum(vals) / len(vals)
    return out


def compare_by_reward(reward, questions: list[Question], model_answers: dict[str, list[str]],
                      baseline_answers: dict[str, list[str]], tie_eps: float = 0.0) -> list[dict]:
    """The judge-free pairing: per question, the higher mean reward wins (ties within ``tie_eps``)."""
    if tie_eps < 0:
        raise JudgeError(f"tie_eps must be >= 0, got {tie_eps}")
    rm = reward_scores(reward, questions, model_answers)
    rb = reward_scores(reward, questions, baseline_answers)
    out = []
    for q in questions:
        diff = rm[q.qid] - rb[q.qid]
        verdict = "win" if diff > tie_eps else "loss" if diff < -tie_eps else "tie"
        out.append({"question_id": q.qid, "category": q.category, "reward_model": rm[q.qid],
                    "reward_baseline": rb[q.qid], "outcome": OUTCOME[verdict],
                    "len_model": _length(model_answers[q.qid]), "len_baseline": _length(baseline_answers[q.qid])})
    return out
