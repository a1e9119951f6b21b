"""Reading alignment data and validating its records: files in, :class:`Example` out.

A dataset is a local JSONL file, a ``datasets`` folder written by ``save_to_disk``, a local
folder of data files, or a hub dataset ``hub:ORG/NAME`` (both through
``datasets.load_dataset``). Four record formats are understood -- preference pairs (``prompt``/``chosen``/``rejected``, as
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
    "HUB_PREFIX",
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
#: data: half of it is labelled undesirable and must not be imitated. Unpaired training
#: (KTO) takes preference pairs too, as TRL's ``unpair_preference_dataset`` does: each pair
#: gives one desirable (chosen) and one undesirable (rejected) example.
ACCEPTED_FORMATS = {
    "pairs": ("pairs",),
    "unpaired": ("unpaired", "pairs"),
    "sft": ("pairs", "prompt_completion"),
    "prompt": FORMATS,
}


class DataError(AlignDistilError, ValueError):
    """A data file or record is malformed; the message names the file and record."""


@dataclass
class DataReport:
    """What happened to the records of one dataset.

    ``n_read + n_unpaired == n_kept + n_skipped_identical + n_skipped_too_long`` always holds
    (``n_unpaired`` is 0 unless pairs were split into KTO examples: each adds one example).

    Attributes:
        n_read: records read from the file.
        n_kept: features returned.
        n_skipped_identical: pairs skipped because ``chosen == rejected`` (as text, or as
            token ids after truncation): they carry no preference signal.
        n_skipped_too_long: records skipped because the prompt left no room for even one
            response token under ``max_length``.
        n_prompt_truncated: kept records whose prompt was cut to ``max_prompt_length``.
        n_prompt_truncated_in_content: of those, the chat prompts cut inside their last
            user message (its start dropped), keeping the template's framing (system
            message, role headers, the assistant header) whole. The others were cut from
            the left of the whole prompt (a leading BOS kept).
        n_response_truncated: kept records with at least one response right-truncated
            (a truncated response loses its final EOS).
        n_unpaired: preference pairs split into one desirable (chosen) and one undesirable
            (rejected) example for unpaired (KTO) training.
        n_desirable, n_undesirable: kept unpaired examples by label (unpaired kind only).
        chat_template: how prompts were rendered (see
            :func:`aligndistil.data.tokenize.chat_template_rule`).
    """

    n_read: int = 0
    n_kept: int = 0
    n_skipped_identical: int = 0
    n_skipped_too_long: int = 0
    n_prompt_truncated: int = 0
    n_prompt_truncated_in_content: int = 0
    n_response_truncated: int = 0
    n_unpaired: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0
    chat_template: str = ""

    def summary(self) -> str:
        """One human-readable line, e.g. for the training log."""
        cut = f"truncated {self.n_prompt_truncated} prompts"
        if self.n_prompt_truncated:
            left = self.n_prompt_truncated - self.n_prompt_truncated_in_content
            how = []
            if self.n_prompt_truncated_in_content:
                how.append(f"{self.n_prompt_truncated_in_content} inside the last user "
                           "message, keeping the chat template's framing")
            if left:
                how.append(f"{left} from the left, keeping BOS")
            cut += f" ({'; '.join(how)})"
        out = (
            f"read {self.n_read} records, kept {self.n_kept}; "
            f"skipped {self.n_skipped_identical} identical pairs and "
            f"{self.n_skipped_too_long} too long; {cut} and {self.n_response_truncated} responses"
        )
        if self.n_unpaired:
            out += (f"; unpaired {self.n_unpaired} preference pairs into one desirable (chosen) "
                    "and one undesirable (rejected) example each")
        if self.n_desirable or self.n_undesirable:
            out += f"; {self.n_desirable} desirable and {self.n_undesirable} undesirable examples"
        if self.chat_template:
            out += f"; {self.chat_template}"
        return out


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


#: Prefix of a dataset given by its ``datasets.load_dataset`` id: ``hub:ORG/NAME``.
HUB_PREFIX = "hub:"

#: What to do without a hub, said by every error of a hub dataset.
NO_HUB_ROUTE = (
    "without a hub, save the dataset once where the hub is reachable, "
    "`datasets.load_dataset(ID, CONFIG, split=SPLIT).save_to_disk(FOLDER)`, and set "
    "data.train_file=FOLDER (or convert it to a local JSONL file)"
)


def load_records(
    path: str | os.PathLike, split: str = "train", config: str | None = None
) -> list[Record]:
    """Read every record of a dataset: a local JSONL file, a local dataset folder or a hub id.

    Args:
        path: one of
            - a JSONL file (one JSON object per line, UTF-8; blank lines are ignored);
            - a folder written by ``datasets.Dataset.save_to_disk`` /
              ``DatasetDict.save_to_disk``;
            - any other local folder ``datasets.load_dataset`` reads (JSON/JSONL/CSV/Parquet
              files, optionally with a README declaring configs);
            - ``"hub:ORG/NAME"``: ``datasets.load_dataset("ORG/NAME", config, split=split)``
              (a local folder also works after ``hub:``).
        split: the split to take (a ``DatasetDict`` folder, a hub dataset, a data folder).
        config: the dataset's configuration name (``load_dataset``'s ``name``) for a hub id
            or a data folder; None for the default one.

    Returns:
        The records, each with a ``where`` such as ``"data.jsonl, line 3"`` or
        ``"folder (split 'train'), index 2"``.

    Raises:
        FileNotFoundError: a local ``path`` does not exist.
        DataError: a line is not valid UTF-8 or JSON or not a JSON object (naming the file
            and line), the folder is not a dataset, ``split`` or ``config`` is not there, or
            a hub dataset cannot be loaded (the message says what to do without a hub).
    """
    path = os.fspath(path)
    if path.startswith(HUB_PREFIX):
        return _load_with_datasets(path[len(HUB_PREFIX):], path, split, config)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"data file not found: {path} (a dataset on the hub is written hub:ORG/NAME)"
        )
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _load_saved_dataset(path, split)
        return _load_with_datasets(path, path, split, config)
    records = []
    # Read bytes and decode line by line, so that a non-UTF-8 byte is reported by its line
    # (a text-mode read reports only a byte offset into a buffer).
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte {e.start + 1} of the line is "
                    f"0x{raw[e.start]:02x}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, where))
    return records


def _is_saved_dataset(path: str) -> bool:
    # The files save_to_disk writes: dataset_dict.json (DatasetDict) or state.json (Dataset).
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "state.json")
    )


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


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _load_with_datasets(source: str, label: str, split: str, config: str | None) -> list[Record]:
    """``datasets.load_dataset(source, config, split=split)``: a hub id or a local data folder."""
    import datasets

    if not source:
        raise DataError(f"{label}: give the dataset id after {HUB_PREFIX!r}, e.g. hub:ORG/NAME")
    local = os.path.isdir(source)
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except ValueError as e:
        # An unknown split or config: datasets lists the available ones in its message.
        raise DataError(f"{label} (config {config!r}, split {split!r}): {e}") from None
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad files: one message
        where = f"{label}: cannot load it with datasets.load_dataset ({type(e).__name__}: {e})"
        if local:
            raise DataError(where) from None
        hint = "the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); " if _offline() else ""
        raise DataError(f"{where}; {hint}{NO_HUB_ROUTE}") from None
    tag = f"{label} ({'config ' + repr(config) + ', ' if config else ''}split {split!r})"
    return [Record(dict(row), f"{tag}, index {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------- formats


def _present(data: dict, key: str) -> bool:
    # Arrow fills a column that is absent from some rows with None: treat it as missing.
    return data.get(key) is not None


def detect_format(records: Sequence[Record], source: str | os.PathLike | None = None) -> str:
    """The format of a dataset, from its first record: one of :data:`FORMATS`.

    A record with ``chosen`` or ``rejected`` is ``"pairs"``; with ``completion`` and
    ``label``, ``"unpaired"``; with ``completion`` only, ``"prompt_completion"``; with
    just ``prompt``, ``"prompt"``. Every record is then validated against that format by
    :func:`parse_record`, so a mixed dataset fails on its first odd record.

    Raises:
        DataError: no records (naming ``source`` when given), or the first record matches
            no format.
    """
    if not records:
        raise DataError(f"{os.fspath(source) + ': ' if source is not None else ''}"
                        "the dataset has no records")
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

