"""Reading alignment data and validating its records: files in, :class:`Example` out.

A dataset is a local JSONL file or a ``datasets`` folder written by ``save_to_disk``. Four
record formats are understood -- preference pairs (``prompt``/``chosen``/``rejected``, as
plain strings or chat message lists, including the "implicit prompt" form where
``chosen``/``rejected`` are whole conversations), unpaired KTO records
(``prompt``/``completion``/``label``), prompt/completion SFT records and prompt-only records
for on-policy generation. The format is detected from the first record and every record
is validated against it; a bad record is reported by file, line (or dataset index) and
field. Tokenising is :mod:`aligndistil.data.tokenize`'s job, batching
:mod:`aligndistil.data.collate`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from aligndistil.errors import AlignDistilError

__all__ = [
    "KINDS",
    "FORMATS",
    "ACCEPTED_FORMATS",
    "DataError",
    "DataReport",
    "Record",
    "Example",
    "load_records",
    "detect_format",
    "parse_record",
    "as_messages",
]


#: What a trainer needs: ``"pairs"`` (DPO, TDPO, AlignDistil, ...), ``"unpaired"`` (KTO),
#: ``"sft"`` and ``"prompt"`` (on-policy generation).
KINDS = ("pairs", "unpaired", "sft", "prompt")

#: Record formats a dataset can be in (detected from its first record).
FORMATS = ("pairs", "unpaired", "prompt_completion", "prompt")

#: Which record formats each kind can be built from. SFT deliberately refuses unpaired
#: data: half of it is labelled undesirable and must not be imitated.
ACCEPTED_FORMATS = {
    "pairs": ("pairs",),
    "unpaired": ("unpaired",),
    "sft": ("pairs", "prompt_completion"),
    "prompt": FORMATS,
}


class DataError(AlignDistilError, ValueError):
    """A data file or record is malformed; the message names the file and record."""


@dataclass
class DataReport:
    """What happened to the records of one dataset.

    ``n_read == n_kept + n_skipped_identical + n_skipped_too_long`` always holds.

    Attributes:
        n_read: records read from the file.
        n_kept: features returned.
        n_skipped_identical: pairs skipped because ``chosen == rejected`` (as text, or as
            token ids after truncation): they carry no preference signal.
        n_skipped_too_long: records skipped because the prompt left no room for even one
            response token under ``max_length``.
        n_prompt_truncated: kept records whose prompt was left-truncated.
        n_response_truncated: kept records with at least one response right-truncated
            (a truncated response loses its final EOS).
    """

    n_read: int = 0
    n_kept: int = 0
    n_skipped_identical: int = 0
    n_skipped_too_long: int = 0
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0

    def summary(self) -> str:
        """One human-readable line, e.g. for the training log."""
        return (
            f"read {self.n_read} records, kept {self.n_kept}; "
            f"skipped {self.n_skipped_identical} identical pairs and "
            f"{self.n_skipped_too_long} too long; truncated {self.n_prompt_truncated} "
            f"prompts and {self.n_response_truncated} responses"
        )


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (``where`` is used in every error)."""

    data: dict
    where: str


@dataclass
class Example:
    """A validated record, normalised to text.

    ``prompt`` is a string or a list of ``{"role", "content"}`` messages; responses are
    always the assistant's text (a response given as messages is reduced to its final
    assistant message). ``is_chat`` is True when the record used message lists anywhere,
    in which case ``prompt`` is a message list.
    """

    prompt: str | list[dict]
    where: str
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    is_chat: bool = False


# --------------------------------------------------------------------------- loading


def load_records(path: str | os.PathLike, split: str = "train") -> list[Record]:
    """Read every record of a local JSONL file or ``save_to_disk`` dataset folder.

    Args:
        path: a JSONL file (one JSON object per line; blank lines are ignored) or a folder
            written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        split: the split to take when the folder holds a ``DatasetDict``.

    Returns:
        The records, each with a ``where`` such as ``"data.jsonl, line 3"`` or
        ``"folder (split 'train'), index 2"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a line is not valid JSON or not a JSON object, the folder is not a
            saved dataset, or ``split`` is not in the ``DatasetDict``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        return _load_saved_dataset(path, split)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, where))
    return records


def _load_saved_dataset(path: str, split: str) -> list[Record]:
    # Imported here so that JSONL-only users never pay for importing `datasets`.
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(
            f"{path} is a folder but not a dataset saved with save_to_disk ({e})"
        ) from None
    label = path
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: split {split!r} not found; available splits: {sorted(ds.keys())}"
            )
        ds = ds[split]
        label = f"{path} (split {split!r})"
    return [Record(dict(row), f"{label}, index {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------- formats


def _present(data: dict, key: str) -> bool:
    # Arrow fills a column that is absent from some rows with None: treat it as missing.
    return data.get(key) is not None


def detect_format(records: Sequence[Record]) -> str:
    """The format of a dataset, from its first record: one of :data:`FORMATS`.

    A record with ``chosen`` or ``rejected`` is ``"pairs"``; with ``completion`` and
    ``label``, ``"unpaired"``; with ``completion`` only, ``"prompt_completion"``; with
    just ``prompt``, ``"prompt"``. Every record is then validated against that format by
    :func:`parse_record`, so a mixed dataset fails on its first odd record.

    Raises:
        DataError: no records, or the first record matches no format.
    """
    if not records:
        raise DataError("the dataset has no records")
    first = records[0]
    d = first.data
    if _present(d, "chosen") or _present(d, "rejected"):
        return "pairs"
    if _present(d, "completion"):
        return "unpaired" if _present(d, "label") else "prompt_completion"
    if _present(d, "prompt"):
        return "prompt"
    raise DataError(
        f"{first.where}: cannot tell the data format from fields {sorted(d)}; expected "
        "prompt/chosen/rejected (pairs), prompt/completion/label (unpaired), "
        "prompt/completion (SFT) or prompt (prompt-only)"
    )


def _messages(value: Any, name: str, where: str) -> list[dict]:
    """Validate a chat message list and keep only role/content.

    Dropping other keys makes prefix comparison robust to the ``None`` fields Arrow adds
    when some messages carry extra keys.
    """
    if not value:
        raise DataError(f"{where}: field {name!r} is an empty message list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {name!r}[{j}] is not a message object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(
                f"{where}: field {name!r}[{j}] needs string 'role' and 'content'"
            )
        out.append({"role": role, "content": content})
    return out


def _prompt(data: dict, where: str) -> str | list[dict]:
    if not _present(data, "prompt"):
        raise DataError(f"{where}: field 'prompt' is missing")
    value = data["prompt"]
    if isinstance(value, str):
        # An empty string prompt is allowed: a BOS token may still precede the response
        # (checked at tokenisation, where we know the tokenizer).
        return value
    if isinstance(value, list):
        return _messages(value, "prompt", where)
    raise DataError(
        f"{where}: field 'prompt' must be a string or a message list, "
        f"got {type(value).__name__}"
    )


def _response(data: dict, name: str, where: str) -> tuple[str, list[dict] | None]:
    """Return ``(assistant text, preceding messages or None if given as a string)``."""
    if not _present(data, name):
        raise DataError(f"{where}: field {name!r} is missing")
    value = data[name]
    if isinstance(value, str):
        text, prefix = value, None
    elif isinstance(value, list):
        msgs = _messages(value, name, where)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: field {name!r} must end with an assistant message, "
                f"ends with role {msgs[-1]['role']!r}"
            )
        text, prefix = msgs[-1]["content"], msgs[:-1]
    else:
        raise DataError(
            f"{where}: field {name!r} must be a string or a message list, "
            f"got {type(value).__name__}"
        )
    if not text.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return text, prefix


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as a chat message list: a string becomes one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _check_prefix(prefix: list[dict] | None, prompt_msgs: list[dict], name: str, where: str):
    # A response given as a whole conversation (e.g. UltraFeedback's chosen =
    # [user, assistant]) must repeat the prompt; otherwise it answers something else.
    if prefix and prefix != prompt_msgs:
        raise DataError(
            f"{where}: the conversation in field {name!r} does not start with the prompt"
        )


def parse_record(record: Record, fmt: str) -> Example:
    """Validate one record against a dataset format and normalise it.

    Args:
        record: a record from :func:`load_records`.
        fmt: the dataset's format, from :func:`detect_format`.

    Returns:
        An :class:`Example`. Identical ``chosen``/``rejected`` are NOT an error here; the
        caller decides (``build_dataset`` skips and counts them).

    Raises:
        DataError: a required field is missing, empty or of the wrong type; the message
            names the record's location and the field.
    """
    d, where = record.data, record.where
    if fmt == "pairs":
        chosen, c_prefix = _response(d, "chosen", where)
        rejected, r_prefix = _response(d, "rejected", where)
        if not _present(d, "prompt"):
            # Implicit prompt: chosen/rejected are whole conversations that share every
            # message but the final assistant answer; that shared prefix is the prompt.
            if c_prefix is None or r_prefix is None:
                raise DataError(
                    f"{where}: field 'prompt' is missing (allowed only when chosen and "
                    "rejected are both message lists sharing the prompt messages)"
                )
            if c_prefix != r_prefix:
                raise DataError(
                    f"{where}: without a 'prompt' field, chosen and rejected must differ "
                    "only in their final assistant message"
                )
            if not c_prefix:
                raise DataError(
                    f"{where}: field 'prompt' is missing and chosen/rejected share no "
                    "prompt messages"
                )
            return Example(c_prefix, where, chosen=chosen, rejected=rejected, is_chat=True)
        prompt = _prompt(d, where)
        is_chat = isinstance(prompt, list) or c_prefix is not None or r_prefix is not None
        if is_chat:
            prompt = as_messages(prompt)
            _check_prefix(c_prefix, prompt, "chosen", where)
            _check_prefix(r_prefix, prompt, "rejected", where)
        return Example(prompt, where, chosen=chosen, rejected=rejected, is_chat=is_chat)
    if fmt in ("unpaired", "prompt_completion"):
        prompt = _prompt(d, where)
        completion, prefix = _response(d, "completion", where)
        label = None
        if fmt == "unpaired":
            if not _present(d, "label"):
                raise DataError(f"{where}: field 'label' is missing")
            label = d["label"]
            if not isinstance(label, bool):
                raise DataError(
                    f"{where}: field 'label' must be true or false, got {label!r}"
                )
        is_chat = isinstance(prompt, list) or prefix is not None
        if is_chat:
            prompt = as_messages(prompt)
            _check_prefix(prefix, prompt, "completion", where)
        return Example(prompt, where, completion=completion, label=label, is_chat=is_chat)
    if fmt == "prompt":
        prompt = _prompt(d, where)
        return Example(prompt, where, is_chat=isinstance(prompt, list))
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")

