"""Per-token operations on aligned logits: the one home of every formula the losses share.

Each takes logits already aligned to response tokens (row ``t`` predicts response token
``t``; see :mod:`aligndistil.model.outputs`) and works over the full vocabulary ``V``:

- :func:`label_logps`: ``log pi(y_t | s_t)``, the building block of the DPO family, TDPO
  and SparsePO;
- :func:`token_kl`: the exact ``KL(p || q)`` at every token (TDPO's forward KL, Eq. 10 of
  "Token-level Direct Preference Optimization" (Zeng et al. 2024); AlignDistil's reverse KL,
  Eq. 18-19 of "AlignDistil" (Zhang et al. 2025));
- :func:`token_tvd`: total variation between two distributions (AlignDistil Eq. 16);
- the AlignDistil teacher: its extrapolation weight ``alpha`` (:func:`vanilla_alpha`,
  Eq. 11; :func:`contrastive_alpha`, Eq. 15; :func:`alpha_from_tvd` and
  :func:`adaptive_alpha`, Eq. 16-17) and its logits ``z* = base + alpha (base - negative)``
  (:func:`teacher_logits`).

The fused, chunked path (:mod:`aligndistil.losses.fused`) computes the same quantities a
chunk of rows at a time. Its kernels take ``alpha`` from :func:`alpha_from_tvd`; under
``torch.compile`` the AlignDistil chunk calls :func:`token_tvd` and :func:`teacher_logits`
themselves, and elsewhere the kernels restate a formula in place only because a new
``rows x V`` buffer would cost memory (each such place names the function here it mirrors). The raw formulas below do no
validation, so that they can run inside a compiled chunk; the validated entry points are
:func:`adaptive_alpha`, :func:`vanilla_alpha`, :func:`contrastive_alpha` and
:func:`aligndistil.losses.aligndistil.aligndistil_teacher_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligndistil.losses.checks import check_adaptive, check_positive, check_teacher_pair


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: ``(B, T, V), (B, T) -> (B, T)``.

    Computed as ``logit[label] - logsumexp(logits)`` so no ``(B, T, V)`` log-softmax is
    kept for backward beyond what autograd needs.
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` at every position: ``(..., V) -> (...)``.

    ``p`` is the FIRST argument: pass the student first for reverse KL (AlignDistil) and
    the reference first for TDPO's forward KL.
    """
    logp = F.log_softmax(p_logits, dim=-1)
    logq = F.log_softmax(q_logits, dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_tvd(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Total variation ``1/2 * sum_v |p(v) - q(v)|`` in ``[0, 1]``: ``(..., V) -> (...)``.

    WITH the 1/2 (AlignDistil Eq. 16; the authors' code omits it, which doubles its ``r``).
    Softmax differences of half-precision logits lose too much, so the arithmetic runs in
    at least fp32; the result has the dtype of ``p_logits``.
    """
    work = torch.promote_types(p_logits.dtype, torch.float32)
    p = F.softmax(p_logits.to(work), dim=-1)
    q = F.softmax(q_logits.to(work), dim=-1)
    return (0.5 * (p - q).abs().sum(dim=-1)).to(p_logits.dtype)


def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sum over tokens: ``(B, T), (B, T) -> (B,)``."""
    return (per_token * mask).sum(dim=-1)


# ----------------------------------------------------------------------------- AlignDistil's teacher
def vanilla_alpha(beta0: float, beta: float) -> float:
    """``alpha`` of the vanilla DPO-reward teacher: ``(beta0/beta) z_dpo + (1 - beta0/beta) z_ref``
    equals ``z_dpo + (beta0/beta - 1)(z_dpo - z_ref)`` (AlignDistil Eq. 11)."""
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    return beta0 / beta - 1.0


def contrastive_alpha(beta0: float, beta: float) -> float:
    """``alpha`` of the contrastive teacher ``z_dpo + (beta0/beta)(z_dpo - z_rev)`` (AlignDistil Eq. 15)."""
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    return beta0 / beta


def alpha_from_tvd(tvd: torch.Tensor, r: float, eps: float) -> torch.Tensor:
    """The token-adaptive weight ``alpha_t = r * TVD_t + eps`` (AlignDistil Eq. 16): ``(...) -> (...)``.

    The raw formula, unvalidated (it also runs on each chunk of the fused path, compiled or
    not); :func:`aligndistil.losses.checks.check_adaptive` checks ``r`` and ``eps`` once at the entry points.
    """
    return r * tvd + eps


def adaptive_alpha(
    dpo_logits: torch.Tensor,
    reverse_dpo_logits: torch.Tensor,
    *,
    r: float,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Token-adaptive extrapolation weight (AlignDistil Eq. 16): ``alpha_t = r * TVD_t + eps``.

    ``TVD_t = 1/2 * sum_v |pi_dpo(v|s_t) - pi_rev(v|s_t)|`` lies in ``[0, 1]``
    (:func:`token_tvd`), so ``alpha_t`` lies in ``[eps, r + eps]``. Paper: ``r`` in 10-20,
    ``eps = 1e-3``.

    Args:
        dpo_logits, reverse_dpo_logits: ``(B, T, V)`` aligned teacher logits.
        r: upper bound of the extrapolation, >= 0.
        eps: floor, > 0 (keeps ``beta_t = beta0/alpha_t`` finite).

    Returns:
        ``(B, T)`` detached ``alpha_t``.
    """
    check_adaptive(r, eps)
    check_teacher_pair("dpo_logits", dpo_logits, "reverse_dpo_logits", reverse_dpo_logits)
    with torch.no_grad():
        return alpha_from_tvd(token_tvd(dpo_logits, reverse_dpo_logits), r, eps)


def teacher_logits(base: torch.Tensor, negative: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """The composite teacher ``z* = base + alpha * (base - negative)`` (AlignDistil Eq. 11, 15, 17).

    Raw formula: ``(..., V), (..., V)`` and a float or a ``(...)`` per-token ``alpha``
    -> ``(..., V)``. No validation and no detaching: see
    :func:`aligndistil.losses.aligndistil.aligndistil_teacher_logits` for the checked one.
    """
    if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
        alpha = alpha.unsqueeze(-1)
    return base + alpha * (base - negative)
