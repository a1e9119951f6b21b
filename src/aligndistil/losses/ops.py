"""Per-token operations on aligned logits that every loss builds on.

Each takes logits already aligned to response tokens (row ``t`` predicts response token
``t``; see :mod:`aligndistil.model.outputs`) and works over the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
