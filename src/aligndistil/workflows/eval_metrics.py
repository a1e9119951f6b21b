"""The evaluation's metrics, as pure functions with their exact definitions.

Each is checked on hand-made cases (``tests/workflows/test_eval_metrics.py``);
:mod:`aligndistil.workflows.evaluate` runs them over models' samples, and make-prefs and the
judge report their means with :func:`mean_ci95`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from aligndistil.losses.ops import token_kl

__all__ = [
    "Z95",
    "mean_ci95",
    "distinct_n",
    "sequence_kl_mc",
    "sequence_kl_tokenwise",
    "reward_accuracy",
    "implicit_rewards",
]

#: Two-sided 95% quantile of the standard normal.
Z95 = 1.959963984540054


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its normal-approximation 95% interval.

    ``half = 1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
    denominator). With fewer than two values the half-width is NaN (no spread to estimate).

    Raises:
        ValueError: no values, or a non-finite value.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci95 needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("mean_ci95 got a non-finite value")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Corpus-level distinct-n: unique word n-grams over all n-grams, across all texts.

    Words are the whitespace-separated tokens of each text (case kept, punctuation attached);
    n-grams never cross text boundaries. Returns 0.0 when no text has ``n`` words.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def sequence_kl_mc(logp_self: torch.Tensor, logp_other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Monte-Carlo term of ``KL(pi_self || pi_other)``: ``(B, T) x 3 -> (B,)``.

    ``sum_t mask * (log pi_self(y_t|s_t) - log pi_other(y_t|s_t))`` for a ``y`` drawn from
    ``pi_self``; its mean over samples is an unbiased estimate of the sequence KL (any single
    term may be negative).
    """
    if not (logp_self.shape == logp_other.shape == mask.shape):
        raise ValueError(f"shapes differ: {tuple(logp_self.shape)}, {tuple(logp_other.shape)}, {tuple(mask.shape)}")
    return ((logp_self - logp_other) * mask).sum(-1)


def sequence_kl_tokenwise(logits_self: torch.Tensor, logits_other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum_t KL(pi_self(.|s_t) || pi_other(.|s_t))`` over the full vocabulary.

    ``(B, T, V), (B, T, V), (B, T) -> (B,)``; never negative (each per-token KL,
    :func:`aligndistil.losses.ops.token_kl` in float32, is clamped at 0 against rounding).
    On samples from ``pi_self`` its mean estimates the same sequence KL as
    :func:`sequence_kl_mc`, with less variance.
    """
    kl = token_kl(logits_self.float(), logits_other.float()).clamp_min(0)
    return (kl * mask).sum(-1)


def reward_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs with ``r(chosen) > r(rejected)``; an exact tie counts one half.

    (Counting ties as half makes a constant reward score 0.5, chance level, rather than 0.)
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected scores")
    if not chosen:
        raise ValueError("reward_accuracy needs at least one pair")
    score = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return score / len(chosen)


def implicit_rewards(logp_num: Sequence[float], logp_den: Sequence[float], beta0: float) -> list[float]:
    """``beta0 * (log pi_num(y|x) - log pi_den(y|x))`` per sequence: the DPO reward
    (num = DPO model, den = reference) or the contrastive reward (den = reverse-DPO model)."""
    return [beta0 * (float(a) - float(b)) for a, b in zip(logp_num, logp_den, strict=True)]
