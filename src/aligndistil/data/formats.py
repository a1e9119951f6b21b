"""Loading, validating, tokenising and batching alignment data.

This module turns a local data file (JSONL, or a ``datasets`` dataset saved with
``save_to_disk``) into the token-id features the trainers consume, and collates those
features into padded tensors. It understands four record formats -- preference pairs
(``prompt``/``chosen``/``rejected``, as plain strings or chat message lists, including
the "implicit prompt" form where ``chosen``/``rejected`` are whole conversations),
unpaired KTO records (``prompt``/``completion``/``label``), prompt/completion SFT records
and prompt-only records for on-policy generation -- and reports every bad record by
file, line (or dataset index) and field. Prompts and responses are tokenised separately
and concatenated, so the prompt/response boundary is exact, and every response ends with
EOS so the model learns to stop. :class:`PreferenceCollator` produces the
``*_response_mask`` tensors that :func:`aligndistil.model.outputs.response_positions` expects
(1 where the token AT that position is a response token); the one-position shift is done
there, never here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = [
    "KINDS",
    "FORMATS",
    "DataError",
    "DataReport",
    "Record",
    "Example",
    "load_records",
    "detect_format",
    "parse_record",
    "render_prompt",
    "tokenize_examples",
    "truncate_feature",
    "build_dataset",
    "PreferenceCollator",
]

#: What a trainer needs: ``"pairs"`` (DPO, TDPO, AlignDistil, ...), ``"unpaired"`` (KTO),
#: ``"sft"`` and ``"prompt"`` (on-policy generation).
KINDS = ("pairs", "unpaired", "sft", "prompt")

#: Record formats a dataset can be in (detected from its first record).
FORMATS = ("pairs", "unpaired", "prompt_completion", "prompt")

# Which record formats each kind can be built from. SFT deliberately refuses unpaired
# data: half of it is labelled undesirable and must not be imitated.
_ACCEPTS = {
    "pairs": ("pairs",),
    "unpaired": ("unpaired",),
    "sft": ("pairs", "prompt_completion"),
    "prompt": FORMATS,
}


class DataError(ValueError):
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


def _as_messages(prompt: str | list[dict]) -> list[dict]:
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
            prompt = _as_messages(prompt)
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
            prompt = _as_messages(prompt)
            _check_prefix(prefix, prompt, "completion", where)
        return Example(prompt, where, completion=completion, label=label, is_chat=is_chat)
    if fmt == "prompt":
        prompt = _prompt(d, where)
        return Example(prompt, where, is_chat=isinstance(prompt, list))
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# ------------------------------------------------------------------------ tokenising


def _wants_chat(example: Example, use_chat_template: bool | None) -> bool:
    if use_chat_template is None:
        return example.is_chat
    if not use_chat_template and example.is_chat:
        raise DataError(
            f"{example.where}: the record is in chat format (message lists) but "
            "use_chat_template=False"
        )
    return use_chat_template


def render_prompt(
    prompt: str | list[dict], tokenizer, use_chat_template: bool, where: str = "prompt"
) -> str:
    """The prompt text to tokenise.

    With the chat template, a string prompt becomes one user message and the text is
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``, so it
    ends with the assistant header and the response follows it directly. Without it the
    prompt string is used as is.

    Raises:
        ValueError: chat formatting is needed but the tokenizer has no ``chat_template``.
    """
    if not use_chat_template:
        if not isinstance(prompt, str):
            raise DataError(f"{where}: a message-list prompt needs the chat template")
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"{where}: the data is in chat format (or use_chat_template=True) but the "
            f"tokenizer {name!r} has no chat_template; set tokenizer.chat_template, or "
            "use plain string data with use_chat_template=False"
        )
    text = tokenizer.apply_chat_template(
        _as_messages(prompt), add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):  # defensive: some versions may return a list of one
        text = text[0]
    return text


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # One batched call (fast tokenizers parallelise it). add_special_tokens=False
    # because special tokens are placed explicitly: BOS below, EOS after responses, and
    # chat templates already render their own BOS.
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize_examples(
    examples: Sequence[Example], tokenizer, kind: str, use_chat_template: bool | None = None
) -> list[dict]:
    """Tokenise examples into untruncated features for :class:`PreferenceCollator`.

    Prompt and response are tokenised separately and their ids concatenated later, so
    the boundary is exact (a joint tokenisation could merge tokens across it). Each
    response is the assistant text's ids followed by ``eos_token_id``. A plain-string
    prompt gets ``bos_token_id`` prepended when the tokenizer has one and the prompt
    does not already start with it; chat prompts get whatever the template renders.

    Args:
        examples: from :func:`parse_record`.
        tokenizer: a Hugging Face tokenizer.
        kind: one of :data:`KINDS`; decides the feature keys: ``prompt_ids`` always,
            plus ``chosen_ids``/``rejected_ids`` (pairs), ``completion_ids`` (sft; the
            chosen response for pair data) or ``completion_ids``/``label`` (unpaired).
        use_chat_template: None = use it for chat-format records only; True = also wrap
            string prompts as one user message; False = never (chat records then fail).

    Raises:
        ValueError: no EOS token, no chat template for chat data, or a prompt that
            tokenises to nothing (the first response token is predicted from the last
            prompt position, so there must be one).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    eos = tokenizer.eos_token_id
    if kind != "prompt" and eos is None:
        raise ValueError("the tokenizer has no eos_token; responses must end with EOS")
    bos = tokenizer.bos_token_id

    prompt_texts, add_bos = [], []
    for ex in examples:
        chat = _wants_chat(ex, use_chat_template)
        prompt_texts.append(render_prompt(ex.prompt, tokenizer, chat, ex.where))
        add_bos.append(not chat and bos is not None)
    if kind == "pairs":
        fields = {"chosen_ids": [ex.chosen for ex in examples],
                  "rejected_ids": [ex.rejected for ex in examples]}
    elif kind == "sft":
        fields = {"completion_ids": [
            ex.completion if ex.completion is not None else ex.chosen for ex in examples
        ]}
    elif kind == "unpaired":
        fields = {"completion_ids": [ex.completion for ex in examples]}
    else:
        fields = {}

    prompt_ids = _encode(tokenizer, prompt_texts)
    encoded = {key: _encode(tokenizer, texts) for key, texts in fields.items()}
    features = []
    for i, ex in enumerate(examples):
        ids = prompt_ids[i]
        if add_bos[i] and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise DataError(
                f"{ex.where}: the prompt tokenises to no tokens and the tokenizer has no "
                "BOS token; the first response token must be predicted from a prompt "
                "position"
            )
        feat = {"prompt_ids": ids}
        for key in encoded:
            feat[key] = encoded[key][i] + [eos]
        if kind == "unpaired":
            feat["label"] = ex.label
        features.append(feat)
    return features


def truncate_feature(
    feature: dict,
    max_length: int | None,
    max_prompt_length: int | None,
    bos_token_id: int | None = None,
) -> tuple[dict | None, bool, bool]:
    """Fit one feature into the length budget.

    The prompt is left-truncated to ``max_prompt_length`` (its END is kept: that is the
    text the response answers; a leading ``bos_token_id`` is kept too, since models are
    trained with BOS at position 0). Then each response is right-truncated so that
    ``len(prompt) + len(response) <= max_length``.

    Returns:
        ``(feature or None, prompt_truncated, response_truncated)``; None when the prompt
        leaves no room for a single response token (the caller skips and counts it).
    """
    out = dict(feature)
    prompt = out["prompt_ids"]
    prompt_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if bos_token_id is not None and prompt[0] == bos_token_id and max_prompt_length > 1:
            prompt = [prompt[0]] + prompt[len(prompt) - (max_prompt_length - 1):]
        else:
            prompt = prompt[len(prompt) - max_prompt_length:]
        out["prompt_ids"] = prompt
        prompt_cut = True
    response_cut = False
    if max_length is not None:
        budget = max_length - len(prompt)
        for key in [k for k in out if k.endswith("_ids") and k != "prompt_ids"]:
            if len(out[key]) > budget:
                if budget <= 0:
                    return None, prompt_cut, response_cut
                out[key] = out[key][:budget]
                response_cut = True
    return out, prompt_cut, response_cut


def build_dataset(
    path: str | os.PathLike,
    tokenizer,
    kind: str,
    max_length: int | None,
    max_prompt_length: int | None,
    use_chat_template: bool | None = None,
    split: str = "train",
) -> tuple[list[dict], DataReport]:
    """Load, validate, tokenise and truncate a dataset for one kind of training.

    Args:
        path: JSONL file or ``save_to_disk`` folder (see :func:`load_records`).
        tokenizer: a Hugging Face tokenizer (with ``chat_template`` for chat data).
        kind: ``"pairs"`` (DPO, TDPO, AlignDistil, ...), ``"unpaired"`` (KTO), ``"sft"``
            (pair data uses ``chosen``; or prompt/completion data) or ``"prompt"`` (any
            record with a prompt; the other fields are still validated).
        max_length: budget for prompt + response tokens, or None for no limit.
        max_prompt_length: budget for prompt tokens, or None for no separate limit.
            Must be smaller than ``max_length`` when both are set.
        use_chat_template: see :func:`tokenize_examples`.
        split: split to use for a saved ``DatasetDict``.

    Returns:
        ``(features, report)``: a list of feature dicts for :class:`PreferenceCollator`
        (wrap it in a ``torch.utils.data.DataLoader`` with the collator), and the counts.

    Raises:
        FileNotFoundError, DataError: see :func:`load_records` and :func:`parse_record`;
            also when the data's format cannot serve ``kind``.
        ValueError: bad arguments or tokenizer (see :func:`tokenize_examples`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if (
        kind != "prompt"
        and max_length is not None
        and max_prompt_length is not None
        and max_prompt_length >= max_length
    ):
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
            f"({max_length}) so that every response keeps at least one token"
        )

    records = load_records(path, split=split)
    fmt = detect_format(records)
    if fmt not in _ACCEPTS[kind]:
        raise DataError(
            f"{os.fspath(path)}: {kind!r} training needs {' or '.join(_ACCEPTS[kind])} "
            f"records, but the data is in {fmt!r} format"
        )
    report = DataReport(n_read=len(records))
    examples = []
    for record in records:
        ex = parse_record(record, fmt)
        if kind == "pairs" and ex.chosen == ex.rejected:
            report.n_skipped_identical += 1
            continue
        examples.append(ex)

    features = []
    for feat in tokenize_examples(examples, tokenizer, kind, use_chat_template):
        feat, prompt_cut, response_cut = truncate_feature(
            feat, max_length if kind != "prompt" else None, max_prompt_length,
            tokenizer.bos_token_id,
        )
        if feat is None:
            report.n_skipped_too_long += 1
            continue
        if kind == "pairs" and feat["chosen_ids"] == feat["rejected_ids"]:
            # Distinct texts can become identical once truncated: still no signal.
            report.n_skipped_identical += 1
            continue
        report.n_prompt_truncated += prompt_cut
        report.n_response_truncated += response_cut
        features.append(feat)
    report.n_kept = len(features)
    return features, report


# ------------------------------------------------------------------------- collating


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, L - len(s):] = 1
    return ids, mask


class PreferenceCollator:
    """Pad a list of features into the batch tensors the trainers use.

    Packed ``[prompt ; response]`` sequences are RIGHT-padded with ``pad_token_id``;
    prompts alone (for generation) are LEFT-padded so that new tokens follow directly.
    Attention masks come from the lengths, never from comparing ids with the pad id, so
    ``pad_token_id == eos_token_id`` is safe. ``*_response_mask`` is 1 where the token AT
    that position is a response token (the convention of
    :func:`aligndistil.model.outputs.response_positions`, which does the one-position shift).
    All tensors are ``torch.long`` except ``label`` (bool).

    Output keys by ``kind``:

    * ``"pairs"``: ``chosen_input_ids``, ``chosen_attention_mask``,
      ``chosen_response_mask`` ``(B, Lc)``; ``rejected_input_ids``,
      ``rejected_attention_mask``, ``rejected_response_mask`` ``(B, Lr)``;
      ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, Lp)``.
    * ``"sft"``: ``input_ids``, ``attention_mask``, ``response_mask`` ``(B, L)``;
      ``prompt_input_ids``, ``prompt_attention_mask``.
    * ``"unpaired"``: as ``"sft"`` plus ``label`` ``(B,)`` bool.
    * ``"prompt"``: ``prompt_input_ids``, ``prompt_attention_mask``.

    Example (BOS = 1, EOS = 2, pad = 0; the test suite runs this example):

    >>> collate = PreferenceCollator(pad_token_id=0, kind="pairs")
    >>> batch = collate([
    ...     {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
    ...     {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12, 2], "rejected_ids": [13, 2]},
    ... ])
    >>> for key, value in batch.items():
    ...     print(f"{key:24} {value.tolist()}")
    chosen_input_ids         [[1, 5, 6, 7, 2, 0], [1, 5, 10, 11, 12, 2]]
    chosen_attention_mask    [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    chosen_response_mask     [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    rejected_input_ids       [[1, 5, 6, 8, 9, 2], [1, 5, 13, 2, 0, 0]]
    rejected_attention_mask  [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    rejected_response_mask   [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    prompt_input_ids         [[1, 5, 6], [0, 1, 5]]
    prompt_attention_mask    [[1, 1, 1], [0, 1, 1]]
    """

    def __init__(self, pad_token_id: int, kind: str):
        """Args: ``pad_token_id`` fills padding; ``kind`` is one of :data:`KINDS`."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(
                f"pad_token_id must be an int, got {pad_token_id!r} (if the tokenizer has "
                "no pad token, pass its eos_token_id: attention masks do not depend on it)"
            )
        self.pad_token_id = pad_token_id
        self.kind = kind

    def _packed(self, features: list[dict], key: str, prefix: str) -> dict[str, torch.Tensor]:
        seqs, resp = [], []
        for b, f in enumerate(features):
            if not f.get(key):
                raise ValueError(f"feature {b} has no {key!r} (or it is empty)")
            seqs.append(f["prompt_ids"] + f[key])
            resp.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
        ids, attn = _right_pad(seqs, self.pad_token_id)
        # Response masks are padded with 0, which _right_pad's id padding cannot express.
        rmask, _ = _right_pad(resp, 0)
        return {
            f"{prefix}input_ids": ids,
            f"{prefix}attention_mask": attn,
            f"{prefix}response_mask": rmask,
        }

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (dicts from :func:`build_dataset`) into a batch."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        for b, f in enumerate(features):
            if not f.get("prompt_ids"):
                raise ValueError(f"feature {b} has no 'prompt_ids' (or it is empty)")
        batch: dict[str, torch.Tensor] = {}
        if self.kind == "pairs":
            batch.update(self._packed(features, "chosen_ids", "chosen_"))
            batch.update(self._packed(features, "rejected_ids", "rejected_"))
        elif self.kind in ("sft", "unpaired"):
            batch.update(self._packed(features, "completion_ids", ""))
        ids, attn = _left_pad([f["prompt_ids"] for f in features], self.pad_token_id)
        batch["prompt_input_ids"] = ids
        batch["prompt_attention_mask"] = attn
        if self.kind == "unpaired":
            labels = []
            for b, f in enumerate(features):
                if not isinstance(f.get("label"), bool):
                    raise ValueError(f"feature {b} needs a bool 'label'")
                labels.append(f["label"])
            batch["label"] = torch.tensor(labels, dtype=torch.bool)
        return batch
