"""Aligning model outputs to the response tokens they predict.

A causal LM fed the packed sequence ``[prompt ; response]`` produces, at input position
``i``, the distribution of the token at position ``i + 1``. So the distribution of the
FIRST response token comes from the LAST prompt position, and the position of the last
response token predicts nothing we train on. Getting this one-position shift wrong is the
most common bug in token-level alignment code (the official AlignDistil code skips the
first response token and distils the position after EOS), so every loss in this package
takes tensors that went through :func:`align_to_response` exactly once.

The helpers here also compute label log-probabilities and per-token full-vocabulary
divergences (KL, TVD) from aligned logits; they are the building blocks the losses use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Aligned:
    """Per-response-token tensors, left-justified.

    Attributes:
        values: ``(B, T, ...)`` the logits (or hidden states) whose row ``t`` predicts
            response token ``t`` of each sequence; rows past a sequence's length hold
            values gathered from prompt or padding positions and must be ignored
            through ``mask``.
        labels: ``(B, T)`` long, the response token ids (0 where ``mask`` is 0).
        mask: ``(B, T)`` float, 1 on real response tokens and 0 on padding.
        positions: ``(B, T)`` long, the input position each row was taken from
            (useful to gather other per-position tensors the same way).
    """

    values: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def response_positions(
    input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input positions whose outputs predict response tokens.

    Args:
        input_ids: ``(B, L)`` packed ``[prompt ; response]`` ids, left or right padded.
        response_mask: ``(B, L)`` 1 where the token AT that position is a response token.

    Returns:
        ``positions (B, T)``, ``labels (B, T)``, ``mask (B, T)`` where ``T`` is the
        largest response length in the batch. Row ``t`` of sequence ``b`` is the input
        position ``i`` with ``response_mask[b, i + 1] == 1``, in order; ``labels`` is the
        token at ``i + 1``.

    Raises:
        ValueError: on shape mismatch, a response token at position 0 (nothing precedes
            it, so no position predicts it: prepend BOS or a prompt), or a sequence with
            no response token.
    """
    if input_ids.dim() != 2 or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be (B, L) and equal"
        )
    rmask = response_mask.bool()
    if rmask[:, 0].any():
        raise ValueError(
            "response_mask marks position 0 as a response token; no position predicts "
            "it. Every response needs at least one token (a BOS or prompt) before it."
        )
    # Shift: output at position i predicts token i + 1.
    target_is_response = rmask[:, 1:]
    counts = target_is_response.sum(dim=1)
    if (counts == 0).any():
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"response_mask has no response token in batch rows {bad}")
    T = int(counts.max())
    # A stable sort of "not a response target" puts the response rows first, in order,
    # whatever the padding side.
    order = torch.argsort((~target_is_response).to(torch.int8), dim=1, stable=True)
    positions = order[:, :T]
    mask = torch.arange(T, device=input_ids.device)[None, :] < counts[:, None]
    labels = torch.gather(input_ids[:, 1:], 1, positions) * mask
    return positions, labels, mask.to(torch.float32)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Gather rows ``values[b, positions[b, t]]`` -> ``(B, T, ...)`` (no copy of B*L*V)."""
    B, T = positions.shape
    idx = positions.reshape(B, T, *([1] * (values.dim() - 2)))
    idx = idx.expand(B, T, *values.shape[2:])
    return torch.gather(values, 1, idx)


def align_to_response(
    values: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> Aligned:
    """Drop prompt rows and shift ``values`` so that row ``t`` predicts response token ``t``.

    Args:
        values: ``(B, L, ...)`` logits ``(B, L, V)`` or hidden states ``(B, L, d)`` of a
            causal LM run on ``input_ids``.
        input_ids: ``(B, L)`` packed ``[prompt ; response]`` ids (left or right padding).
        response_mask: ``(B, L)`` 1 where the token at that position belongs to the response.

    Returns:
        :class:`Aligned` with ``values`` of shape ``(B, T, ...)``.
    """
    if values.shape[:2] != input_ids.shape:
        raise ValueError(
            f"values {tuple(values.shape)} do not match input_ids {tuple(input_ids.shape)} "
            "in their first two dimensions"
        )
    positions, labels, mask = response_positions(input_ids, response_mask)
    aligned = gather_positions(values, positions)
    return Aligned(values=aligned, labels=labels, mask=mask.to(values.dtype if values.is_floating_point() else torch.float32), positions=positions)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: ``(B, T, V), (B, T) -> (B, T)``.

    Computed as ``logit[label] - logsumexp(logits)`` so no ``(B, T, V)`` log-softmax is
    kept for backward beyond what autograd needs.
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q)`` over the vocabulary at every position: ``(..., V) -> (...)``.

    ``p`` is the FIRST argument: pass the student first for reverse KL (AlignDistil) and
    the reference first for TDPO's forward KL.
    """
    logp = F.log_softmax(p_logits, dim=-1)
    logq = F.log_softmax(q_logits, dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_tvd(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Total variation ``1/2 * sum_v |p(v) - q(v)|`` in ``[0, 1]``: ``(..., V) -> (...)``."""
    return 0.5 * (F.softmax(p_logits, dim=-1) - F.softmax(q_logits, dim=-1)).abs().sum(dim=-1)


def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sum over tokens: ``(B, T), (B, T) -> (B,)``."""
    return (per_token * mask).sum(dim=-1)
