"""Batching: THE padding helpers of the package, and the collator of training batches.

Every padded tensor in aligndistil is built here: the collator's batches, prompts for
generation (:mod:`aligndistil.model.sampling`), the reward model's inputs
(:mod:`aligndistil.rewards.bradley_terry`) and the repacked on-policy samples
(:mod:`aligndistil.train.methods`). Attention masks always come from the sequence lengths,
never from comparing ids with the pad id, so ``pad_token_id == eos_token_id`` is safe.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aligndistil.data.records import KINDS

__all__ = ["pad_with_mask", "pad_right", "PreferenceCollator"]


def pad_with_mask(
    seqs: Sequence[Sequence[int] | torch.Tensor],
    value: int,
    *,
    side: str = "right",
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences into ``(ids, mask)``, both ``(N, length)``, padded on ``side``.

    Args:
        seqs: ``N`` lists of ints, or ``N`` 1-D tensors (their dtype and device are kept).
        value: written into padding.
        side: ``"right"`` (packed training sequences: tokens start at column 0) or
            ``"left"`` (prompts for generation: new tokens follow the last column).
        length: width of the result; default (None or 0) the longest sequence.

    Returns:
        ``ids`` (``torch.long`` for lists) and ``mask`` (``torch.long``, 1 on the
        sequence's own tokens, 0 on padding, on the device of ``ids``).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not len(seqs):
        raise ValueError("nothing to pad: no sequences")
    rows = [s if isinstance(s, torch.Tensor) else torch.tensor(list(s), dtype=torch.long) for s in seqs]
    width = length or max(int(r.numel()) for r in rows)
    ids = rows[0].new_full((len(rows), width), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=ids.device)
    for i, r in enumerate(rows):
        n = int(r.numel())
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int] | torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    """Stack sequences into ``(N, length)``, right-padded with ``value`` (see :func:`pad_with_mask`)."""
    return pad_with_mask(seqs, value, side="right", length=length)[0]


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
        ids, attn = pad_with_mask(seqs, self.pad_token_id, side="right")
        # Response masks are padded with 0, whatever the pad id.
        rmask = pad_right(resp, 0)
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
        ids, attn = pad_with_mask([f["prompt_ids"] for f in features], self.pad_token_id, side="left")
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

