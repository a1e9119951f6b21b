"""Reductions that stay exact under gradient accumulation and data parallelism.

A per-micro-batch ``mean()`` is wrong for token-level losses: with micro-batches of
different sizes (or different token counts) the average of averages is not the average
over the optimizer step. Instead each micro-batch contributes ``sum(losses) / N``, where
``N`` is the number of sequences (or tokens) in the WHOLE optimizer step, over every
micro-batch and every rank. Summing those contributions over micro-batches (gradient
accumulation) gives exactly the full-batch mean.

Data parallelism: DDP, DeepSpeed and FSDP AVERAGE gradients over ``world_size`` ranks, so
each rank multiplies its contribution by ``world_size`` to turn that average back into a
sum. Both normalisers are passed in; nothing here talks to a process group, which keeps
these functions pure and testable by simulating ranks.
"""

from __future__ import annotations

import torch


def _check_normaliser(name: str, value) -> None:
    if float(value) <= 0:
        raise ValueError(f"{name} must be > 0 (the global count for the optimizer step), got {value!r}")


def sequence_mean(losses: torch.Tensor, num_sequences: float | torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """``sum_b losses[b] * world_size / num_sequences`` -> scalar.

    Args:
        losses: ``(B,)`` per-sequence (or per-pair) losses of one micro-batch on one rank.
        num_sequences: global number of sequences in the optimizer step (all micro-batches,
            all ranks).
        world_size: number of data-parallel ranks whose gradients are averaged.
    """
    _check_normaliser("num_sequences", num_sequences)
    if losses.dim() != 1:
        raise ValueError(f"losses must be (B,), got {tuple(losses.shape)}")
    return losses.sum() * (world_size / num_sequences)


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """``sum_{b,t} per_token * mask * world_size / num_tokens`` -> scalar.

    Args:
        per_token: ``(B, T)`` per-token losses.
        mask: ``(B, T)`` response mask.
        num_tokens: global number of response tokens in the optimizer step.
        world_size: number of data-parallel ranks whose gradients are averaged.
    """
    _check_normaliser("num_tokens", num_tokens)
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    return (per_token * mask).sum() * (world_size / num_tokens)
