"""Built-in task prompt sets and a strict reader for prompt files.

The sentiment task asks a policy to respond to short, tonally neutral prompts (review
openers such as "My review of the new coffee shop downtown:" and opinion questions such
as "What do you think of rainy Sunday mornings?") and scores the responses with the
``vader`` reward. Its prompts ship with the package as two plain-text files, one prompt
per line, split into train and test sets with no prompt in both. :func:`load_prompts`
reads those (by the names ``"sentiment:train"`` / ``"sentiment:test"``) or any user file
in the same format, and rejects empty lines and duplicates by file and line number,
since either would silently skew what a run trains or is evaluated on.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from aligndistil.errors import AlignDistilError

__all__ = ["PROMPT_SETS", "PromptFileError", "load_prompts", "prompt_set_path"]

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
