"""Argument validation shared by the losses.

Every loss refuses bad input with a ``ValueError`` that names the argument, instead of
returning a silent NaN that would only surface many steps later as a diverged run.
"""

from __future__ import annotations

import math

import torch


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse NaN or inf values in ``t``."""
    # Teacher and policy logits reach here detached or not; the check itself is cheap
    # next to the softmax that follows and does not build any graph.
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name} contains NaN or inf values")


def check_positive(name: str, value: float) -> None:
    """Refuse ``value <= 0`` (or NaN)."""
    if isinstance(value, torch.Tensor):
        if not bool((value > 0).all()):
            raise ValueError(f"{name} must be > 0")
        return
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """Refuse ``value < 0`` (or NaN)."""
    if not (value >= 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> None:
    """A ``(B, T)`` mask matching ``shape`` with at least one response token per row."""
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be (B, T), got {tuple(mask.shape)}")
    empty = (mask.detach().sum(dim=-1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} has no response token in batch rows {empty}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """All given tensors share one shape."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}"
            )


def check_logits(name: str, logits: torch.Tensor, mask_name: str, mask: torch.Tensor) -> None:
    """``(B, T, V)`` finite logits whose first two dims match a ``(B, T)`` mask."""
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (B, T, V), got {tuple(logits.shape)}")
    check_mask(mask_name, mask, logits.shape[:2])
    check_finite(name, logits)


def check_labels(name: str, labels: torch.Tensor, mask_name: str, mask: torch.Tensor, vocab: int) -> None:
    """``(B, T)`` integer labels inside the vocabulary."""
    if labels.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {tuple(mask.shape)} like {mask_name}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"{name} has ids outside [0, {vocab})")


def check_token_logps(name: str, logps: torch.Tensor, mask: torch.Tensor | None, mask_name: str) -> None:
    """Per-token ``(B, T)`` log-probs with a mask, or per-sequence ``(B,)`` without."""
    if mask is None:
        if logps.dim() != 1:
            raise ValueError(f"{name} must be (B,) sequence log-probs when {mask_name} is None, got {tuple(logps.shape)}")
    else:
        if logps.dim() != 2:
            raise ValueError(f"{name} must be (B, T) per-token log-probs, got {tuple(logps.shape)}")
        if mask.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(logps.shape)} but {mask_name} has {tuple(mask.shape)}")
        check_mask(mask_name, mask, logps.shape)
    check_finite(name, logps)


def check_teacher_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two teachers' logits: one shape, finite values."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")
    check_finite(name_a, a)
    check_finite(name_b, b)


def check_adaptive(r: float | None, eps: float) -> None:
    """``r >= 0`` (required) and ``eps > 0`` (keeps ``beta_t = beta0 / alpha_t`` finite)."""
    if r is None:
        raise ValueError("the adaptive teacher needs r (alpha_t = r * TVD + eps); pass r, or a fixed alpha")
    check_nonnegative("r", r)
    check_positive("eps", eps)
