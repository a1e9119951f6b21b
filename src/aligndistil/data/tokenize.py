"""From validated records to token-id features: prompt rendering, tokenising, truncation.

Prompts and responses are tokenised separately and concatenated, so the prompt/response
boundary is exact, and every response ends with EOS so the model learns to stop. A
feature is a dict of plain id lists (``prompt_ids`` plus ``chosen_ids``/``rejected_ids``
or ``completion_ids``); :class:`aligndistil.data.collate.PreferenceCollator` pads them into
batches. :func:`build_dataset` is the whole path: load, validate, tokenise, truncate, count.

One rule decides whether a prompt goes through the tokenizer's chat template, the same for
training data and for ``aligndistil eval`` / generation (:func:`resolve_chat_template`):
``use_chat_template=None`` (the default, "auto") applies it whenever the tokenizer has one,
a string prompt becoming one user message; ``True`` always (an error without a template);
``False`` never (message-list prompts are then an error). Without the template a prompt is
raw text after BOS. A chat prompt over ``max_prompt_length`` is cut inside its last user
message, so the template's framing (system message, role headers, assistant header) stays
whole; :class:`aligndistil.data.records.DataReport` says how many prompts were cut and how.
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

__all__ = [
    "resolve_chat_template",
    "chat_template_rule",
    "render_prompt",
    "tokenize_examples",
    "prompt_frame",
    "truncate_in_content",
    "truncate_feature",
    "build_dataset",
]


def resolve_chat_template(tokenizer, use_chat_template: bool | None) -> bool:
    """Whether string prompts go through the chat template: the one rule of training and eval.

    ``None`` (auto): when the tokenizer has a ``chat_template``; ``True``/``False``: as given.
    (Message-list prompts always need the template, whatever this says.)
    """
    if use_chat_template is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(use_chat_template)


def chat_template_rule(tokenizer, use_chat_template: bool | None) -> str:
    """One line saying how prompts are rendered, for the data report and the eval output."""
    setting = "auto" if use_chat_template is None else str(bool(use_chat_template)).lower()
    if resolve_chat_template(tokenizer, use_chat_template):
        return (f"chat template applied to every prompt (use_chat_template={setting}; "
                "a string prompt is one user message)")
    why = "the tokenizer has none" if use_chat_template is None else "switched off"
    return (f"no chat template (use_chat_template={setting}: {why}); prompts are raw "
            "text after BOS")


def _wants_chat(example: Example, tokenizer, use_chat_template: bool | None) -> bool:
    if use_chat_template is None:
        # Auto: the template when the tokenizer has one; a message list needs it anyway
        # (render_prompt then says the tokenizer has none).
        return example.is_chat or resolve_chat_template(tokenizer, None)
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
        use_chat_template: None (auto) = the template whenever the tokenizer has one (a
            string prompt becomes one user message); True = always; False = never (chat
            records then fail). See :func:`resolve_chat_template`.

    Raises:
        ValueError: no EOS token, no chat template for chat data, or a prompt that
            tokenises to nothing (the first response token is predicted from the last
            prompt position, so there must be one).
    """
    return _tokenize(examples, tokenizer, kind, use_chat_template)[0]


def _tokenize(examples, tokenizer, kind, use_chat_template) -> tuple[list[dict], list[bool]]:
    """:func:`tokenize_examples`, also returning which prompts went through the template."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    eos = tokenizer.eos_token_id
    if kind != "prompt" and eos is None:
        raise ValueError("the tokenizer has no eos_token; responses must end with EOS")
    bos = tokenizer.bos_token_id

    prompt_texts, add_bos, chats = [], [], []
    for ex in examples:
        chat = _wants_chat(ex, tokenizer, use_chat_template)
        prompt_texts.append(render_prompt(ex.prompt, tokenizer, chat, ex.where))
        add_bos.append(not chat and bos is not None)
        chats.append(chat)
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
    return features, chats


# A marker no real prompt contains (private-use code points), put in place of the content
# to find where the template puts it.
_MARK = "\ue000aligndistil-content\ue001"


def prompt_frame(prompt: str | list[dict], tokenizer) -> tuple[list[int], list[int], list[int]] | None:
    """A chat prompt split as ``(head ids, content ids, tail ids)`` around its last user message.

    ``head`` is everything the template renders before that message's content (BOS, system
    message, earlier turns, the user header), ``tail`` everything after it (the turn end and
    the assistant header). Each piece is tokenised on its own. None when the template does not
    show the content exactly once (then the prompt cannot be cut inside it).
    """
    msgs = [dict(m) for m in as_messages(prompt)]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    at = users[-1] if users else len(msgs) - 1
    content = msgs[at]["content"]
    msgs[at]["content"] = _MARK
    text = render_prompt(msgs, tokenizer, True)
    if text.count(_MARK) != 1:
        return None
    head, tail = text.split(_MARK)
    head_ids, content_ids, tail_ids = (
        [list(x) for x in tokenizer([head, content, tail], add_special_tokens=False)["input_ids"]]
    )
    return head_ids, content_ids, tail_ids


def truncate_in_content(frame: tuple[list[int], list[int], list[int]], max_prompt_length: int) -> list[int] | None:
    """``head + content[-k:] + tail`` with the largest ``k`` that fits ``max_prompt_length``.

    The START of the user content is dropped (its end, next to the response, is kept), and the
    template's framing stays whole. None when the framing alone leaves no room for one
    content token.
    """
    head, content, tail = frame
    budget = max_prompt_length - len(head) - len(tail)
    if budget < 1:
        return None
    return head + content[max(0, len(content) - budget):] + tail


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
    config: str | None = None,
) -> tuple[list[dict], DataReport]:
    """Load, validate, tokenise and truncate a dataset for one kind of training.

    Args:
        path: a JSONL file, a dataset folder or ``hub:ORG/NAME`` (see :func:`load_records`).
        tokenizer: a Hugging Face tokenizer (with ``chat_template`` for chat data).
        kind: ``"pairs"`` (DPO, TDPO, AlignDistil, ...), ``"unpaired"`` (KTO: unpaired
            records, or preference pairs split into a desirable chosen and an undesirable
            rejected example each), ``"sft"`` (pair data uses ``chosen``; or
            prompt/completion data) or ``"prompt"`` (any record with a prompt; the other
            fields are still validated).
        max_length: budget for prompt + response tokens, or None for no limit.
        max_prompt_length: budget for prompt tokens, or None for no separate limit.
            Must be smaller than ``max_length`` when both are set. A chat prompt is cut
            inside its last user message (:func:`truncate_in_content`), any other from the
            left (:func:`truncate_feature`).
        use_chat_template: None (auto), True or False; see :func:`resolve_chat_template`.
        split: split to use (a saved ``DatasetDict``, a data folder, a hub dataset).
        config: dataset configuration name for ``datasets.load_dataset`` (hub or data folder).

    Returns:
        ``(features, report)``: a list of feature dicts for :class:`aligndistil.data.collate.PreferenceCollator`
        (wrap it in a ``torch.utils.data.DataLoader`` with the collator), and the counts.

    Raises:
        FileNotFoundError, DataError: see :func:`load_records` and :func:`parse_record`;
            also when the data's format cannot serve ``kind``, or when the dataset has no
            records or none is left after skipping (the message names ``path``).
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

    source = os.fspath(path)
    records = load_records(path, split=split, config=config)
    fmt = detect_format(records, source)
    if fmt not in ACCEPTED_FORMATS[kind]:
        raise DataError(
            f"{source}: {kind!r} training needs {' or '.join(ACCEPTED_FORMATS[kind])} "
            f"records, but the data is in {fmt!r} format"
        )
    report = DataReport(n_read=len(records), chat_template=chat_template_rule(tokenizer, use_chat_template))
    examples = []
    for record in records:
        ex = parse_record(record, fmt)
        if fmt == "pairs" and kind in ("pairs", "unpaired") and ex.chosen == ex.rejected:
            report.n_skipped_identical += 1
            continue
        if kind == "unpaired" and fmt == "pairs":
            # TRL's unpair_preference_dataset: the chosen answer is a desirable example,
            # the rejected one an undesirable example, both for the pair's prompt.
            report.n_unpaired += 1
            examples += [
                Example(ex.prompt, f"{ex.where} (chosen)", completion=ex.chosen, label=True,
                        is_chat=ex.is_chat),
                Example(ex.prompt, f"{ex.where} (rejected)", completion=ex.rejected, label=False,
                        is_chat=ex.is_chat),
            ]
            continue
        examples.append(ex)

    features = []
    feats, chats = _tokenize(examples, tokenizer, kind, use_chat_template)
    for ex, chat, feat in zip(examples, chats, feats):
        in_content = False
        if chat and max_prompt_length is not None and len(feat["prompt_ids"]) > max_prompt_length:
            frame = prompt_frame(ex.prompt, tokenizer)
            ids = truncate_in_content(frame, max_prompt_length) if frame is not None else None
            if ids is not None:
                feat, in_content = {**feat, "prompt_ids": ids}, True
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
        report.n_prompt_truncated += bool(prompt_cut or in_content)
        report.n_prompt_truncated_in_content += in_content
        report.n_response_truncated += response_cut
        if kind == "unpaired":
            report.n_desirable += feat["label"] is True
            report.n_undesirable += feat["label"] is False
        features.append(feat)
    report.n_kept = len(features)
    if not features:
        raise DataError(f"{source}: no usable records left ({report.summary()})")
    return features, report
