"""Built-in task prompt sets and a strict reader for prompt files.

The sentiment task asks a policy to respond to short, tonally neutral prompts (review
openers such as "My review of the new coffee shop downtown:" and opinion questions such
as "What do you think of rainy Sunday mornings?") and scores the responses with the
``vader`` reward. Its prompts ship with the package as two plain-text files, one prompt
per line, split into train and test sets with no prompt in both. :func:`load_prompts`
reads those (by the names ``"sentiment:train"`` / ``"sentiment:test"``) or any user file
in the same format, and rejects empty lines and duplicates by file and line number,
since either would silently skew what a run trains or is evaluated on.

:func:`read_eval_prompts` is what ``aligndistil eval --prompts`` reads: a shipped set, a text
file (one prompt per line), or a dataset in any training-data format (JSONL, a dataset
folder or ``hub:ORG/NAME``) whose records give their prompt: ``prompt`` as a string or a
message list, or the shared conversation before ``chosen``/``rejected``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from aligndistil.errors import AlignDistilError

__all__ = ["PROMPT_SETS", "DATA_SUFFIXES", "PromptFileError", "load_prompts", "prompt_set_path",
           "read_eval_prompts", "prompt_text"]

#: File suffixes read as training-data records rather than as one prompt per line.
DATA_SUFFIXES = (".jsonl", ".json")

#: Named prompt sets shipped in ``aligndistil/resources``.
PROMPT_SETS: dict[str, str] = {
    "sentiment:train": "sentiment_prompts_train.txt",
    "sentiment:test": "sentiment_prompts_test.txt",
}


class PromptFileError(AlignDistilError, ValueError):
    """A prompt file is missing, unreadable, or has an empty or duplicate line."""


def prompt_set_path(name: str):
    """Return a readable path-like (a ``Traversable``) for a shipped prompt set."""
    try:
        filename = PROMPT_SETS[name]
    except KeyError:
        raise PromptFileError(
            f"unknown prompt set {name!r}; shipped sets are {sorted(PROMPT_SETS)}"
        ) from None
    return resources.files("aligndistil").joinpath("resources", filename)


def load_prompts(path_or_split: str | os.PathLike) -> list[str]:
    """Read a prompt file, one prompt per line, and return the prompts in file order.

    Args:
        path_or_split: a shipped set (``"sentiment:train"``, ``"sentiment:test"``) or
            the path of a UTF-8 text file.

    Each line is stripped of surrounding whitespace. A trailing newline at the end of
    the file is fine; any other empty (or whitespace-only) line is an error, as is a
    prompt that appears twice.

    Raises:
        PromptFileError: naming the file and line of the first problem.
    """
    if isinstance(path_or_split, str) and path_or_split in PROMPT_SETS:
        source = prompt_set_path(path_or_split)
        label = f"{path_or_split} ({source})"
    else:
        source = Path(path_or_split)
        label = str(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {label}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {label}: {exc}") from exc

    prompts: list[str] = []
    first_seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt:
            raise PromptFileError(f"{label}, line {lineno}: empty line")
        if prompt in first_seen:
            raise PromptFileError(
                f"{label}, line {lineno}: duplicate of line {first_seen[prompt]}: {prompt!r}"
            )
        first_seen[prompt] = lineno
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"prompt file {label} holds no prompts")
    return prompts


def read_eval_prompts(spec: str | os.PathLike) -> tuple[list, str]:
    """The prompts of an evaluation, from a prompt set, a text file or a training dataset.

    Args:
        spec: a shipped set (``sentiment:test``); a ``.jsonl``/``.json`` file, a dataset
            folder or ``hub:ORG/NAME`` in any training-data format (read with
            :func:`aligndistil.data.records.load_records`; each record gives its prompt: a
            string, a message list, or the conversation ``chosen``/``rejected`` share);
            any other file is plain text, one prompt per line (:func:`load_prompts`).

    Returns:
        ``(prompts, note)``: each prompt a string or a message list, in file order, a prompt
        repeated by several records (several pairs per prompt) kept once; ``note`` says
        where they came from and how many repeats were dropped.

    Raises:
        PromptFileError: a text file's empty or duplicate line (by file and line).
        FileNotFoundError, DataError: a missing file, or a record that gives no prompt
            (by file and line, naming the field).
    """
    from aligndistil.data.records import HUB_PREFIX, detect_format, load_records, parse_record

    text = os.fspath(spec)
    is_data = (text.startswith(HUB_PREFIX) or Path(text).suffix.lower() in DATA_SUFFIXES
               or Path(text).is_dir())
    if text in PROMPT_SETS or not is_data:
        prompts = load_prompts(spec)
        return prompts, f"{len(prompts)} prompts, one per line of {text}"
    records = load_records(text)
    fmt = detect_format(records, text)
    prompts, seen = [], set()
    for record in records:
        prompt = parse_record(record, fmt).prompt
        key = repr(prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    dropped = len(records) - len(prompts)
    note = f"{len(prompts)} prompts from the {len(records)} {fmt!r} records of {text}"
    if dropped:
        note += f" ({dropped} repeated prompts kept once)"
    return prompts, note


def prompt_text(prompt: str | list[dict]) -> str:
    """The text a reward sees as the prompt: a string as is, a message list's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
