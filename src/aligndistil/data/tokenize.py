"""From validated records to token-id features: prompt rendering, tokenising, truncation.

Prompts and responses are tokenised separately and concatenated, so the prompt/response
boundary is exact, and every response ends with EOS so the model learns to stop. A
feature is a dict of plain id lists (``prompt_ids`` plus ``chosen_ids``/``rejected_ids``
or ``completion_ids``); :class:`aligndistil.data.collate.PreferenceCollator` pads them into
batches. :func:`build_dataset` is the whole path: load, validate, tokenise, truncate, count.
"""

from __future__ import annotations

import os
from typing import Sequence

from aligndistil.data.records import (
    ACCEPTED_FORMATS,
    KINDS,
    DataError,
    DataReport,
    Example,
    as_messages,
    detect_format,
    load_records,
    parse_record,
)

__all__ = ["render_prompt", "tokenize_examples", "truncate_feature", "build_dataset"]


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
        as_messages(prompt), add_generation_prompt=True, tokenize=False
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
    """Tokenise examples into untruncated features for :class:`aligndistil.data.collate.PreferenceCollator`.

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
        ``(features, report)``: a list of feature dicts for :class:`aligndistil.data.collate.PreferenceCollator`
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
    if fmt not in ACCEPTED_FORMATS[kind]:
        raise DataError(
            f"{os.fspath(path)}: {kind!r} training needs {' or '.join(ACCEPTED_FORMATS[kind])} "
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

