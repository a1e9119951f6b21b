"""AlignDistil: RLHF with a DPO reward as token-level distillation (aligndistil-paper §3-4).

Theorem 1 (Eq. 11) shows that RLHF with the DPO reward ``beta0 log pi_dpo/pi_ref`` and KL
weight ``beta`` is, per state, a reverse-KL distillation of the policy toward a teacher
whose logits mix the DPO model's and the reference's. With the contrastive reward
``beta0 log pi_dpo/pi_rev`` (Eq. 12-15) the teacher extrapolates the DPO model away from
the reverse-DPO model; the token-adaptive variant (Eq. 16-17) uses a per-token weight
``alpha_t = r * TVD(pi_dpo, pi_rev) + eps``.

All three teachers have one form, ``base + alpha * (base - negative)``:

========================  ========  ===========  ==========================
teacher                   base      negative     alpha
========================  ========  ===========  ==========================
vanilla (Eq. 11)          dpo       ref          ``beta0/beta - 1``
contrastive (Eq. 15)      dpo       reverse dpo  ``beta0/beta``
adaptive (Eq. 17)         dpo       reverse dpo  ``r * TVD_t + eps``
========================  ========  ===========  ==========================

The loss (Eq. 18 on-policy, Eq. 19 off-policy) is the EXACT reverse KL
``KL(pi_theta || softmax(z*))`` summed over the vocabulary at each response token, weighted
per token by ``beta_t = beta0 / alpha_t`` and normalised by the response length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligndistil.losses.ops import token_tvd
from aligndistil.losses.checks import check_finite, check_logits, check_nonnegative, check_positive

WEIGHTINGS = ("beta_t", "uniform")


def _check_teacher_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two teachers' logits: one shape, finite values."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")
    check_finite(name_a, a)
    check_finite(name_b, b)


def aligndistil_teacher_logits(
    base_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    alpha: torch.Tensor | float,
) -> torch.Tensor:
    """Composite teacher logits ``z* = base + alpha * (base - negative)`` (Eq. 11, 15, 17).

    Args:
        base_logits: ``(B, T, V)`` the DPO model's aligned logits ``z^dpo``.
        negative_logits: ``(B, T, V)`` ``z^ref`` (vanilla) or ``z^rev`` (contrastive, adaptive).
        alpha: a float (vanilla: ``beta0/beta - 1``; contrastive: ``beta0/beta``) or a
            ``(B, T)`` tensor of per-token ``alpha_t`` (adaptive, :func:`adaptive_alpha`).

    Returns:
        ``(B, T, V)`` teacher logits, detached (teachers carry no gradient).
    """
    _check_teacher_pair("base_logits", base_logits, "negative_logits", negative_logits)
    base, neg = base_logits.detach(), negative_logits.detach()
    if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
        if alpha.shape != base.shape[:-1]:
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected {tuple(base.shape[:-1])} or a scalar")
        check_finite("alpha", alpha)
        alpha = alpha.detach().unsqueeze(-1)
    elif not torch.isfinite(torch.as_tensor(alpha)).all():
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return base + alpha * (base - neg)


def vanilla_alpha(beta0: float, beta: float) -> float:
    """``alpha`` of the vanilla DPO-reward teacher: ``(beta0/beta) z_dpo + (1 - beta0/beta) z_ref``
    equals ``z_dpo + (beta0/beta - 1)(z_dpo - z_ref)`` (Eq. 11)."""
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    return beta0 / beta - 1.0


def contrastive_alpha(beta0: float, beta: float) -> float:
    """``alpha`` of the contrastive teacher ``z_dpo + (beta0/beta)(z_dpo - z_rev)`` (Eq. 15)."""
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    return beta0 / beta


def adaptive_alpha(
    dpo_logits: torch.Tensor,
    reverse_dpo_logits: torch.Tensor,
    *,
    r: float,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Token-adaptive extrapolation weight (Eq. 16): ``alpha_t = r * TVD_t + eps``.

    ``TVD_t = 1/2 * sum_v |pi_dpo(v|s_t) - pi_rev(v|s_t)|`` lies in ``[0, 1]`` (WITH the
    1/2: the official code omits it, which doubles its ``r``), so ``alpha_t`` lies in
    ``[eps, r + eps]``. Paper: ``r`` in 10-20, ``eps = 1e-3``.

    Args:
        dpo_logits, reverse_dpo_logits: ``(B, T, V)`` aligned teacher logits.
        r: upper bound of the extrapolation, >= 0.
        eps: floor, > 0 (keeps ``beta_t = beta0/alpha_t`` finite).

    Returns:
        ``(B, T)`` detached ``alpha_t``.
    """
    check_nonnegative("r", r)
    check_positive("eps", eps)
    _check_teacher_pair("dpo_logits", dpo_logits, "reverse_dpo_logits", reverse_dpo_logits)
    with torch.no_grad():
        # Softmax differences of half-precision logits lose too much: compute in at least fp32.
        work = torch.promote_types(dpo_logits.dtype, torch.float32)
        return r * token_tvd(dpo_logits.to(work), reverse_dpo_logits.to(work)).to(dpo_logits.dtype) + eps


def token_weights(alpha: torch.Tensor | float | None, beta0: float, weighting: str, like: torch.Tensor,
                  beta: float | None = None) -> torch.Tensor:
    """Per-token loss weights ``(B, T)``: ``beta_t = beta0 / alpha_t``, a constant ``beta``, or ones."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "uniform":
        return torch.ones_like(like)
    if beta is not None:
        check_positive("beta", beta)
        return torch.full_like(like, float(beta))
    if alpha is None:
        raise ValueError("alpha is required (or pass beta, the vanilla teacher's constant weight)")
    check_positive("beta0", beta0)
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if a.dim() > 0 and a.shape != like.shape:
        raise ValueError(f"alpha has shape {tuple(a.shape)}, expected {tuple(like.shape)} or a scalar")
    if not bool((a > 0).all()) or not torch.isfinite(a).all():
        raise ValueError("alpha must be finite and > 0 for weighting='beta_t' (beta_t = beta0/alpha_t)")
    return (beta0 / a.detach()).expand_as(like)


def aligndistil_loss(
    policy_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: torch.Tensor | float | None = None,
    beta0: float = 0.1,
    weighting: str = "beta_t",
    beta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AlignDistil loss, per sequence (Eq. 18 on-policy, Eq. 19 off-policy).

    ``L(y) = (1/|y|) sum_t beta_t * KL(pi_theta(.|s_t) || softmax(z*_t))`` with
    ``beta_t = beta0 / alpha_t``: an exact REVERSE KL (student first) over the whole
    vocabulary, not a sampled estimate. ``z*`` carries no gradient.

    Normalisation: each sequence's weighted KL sum is divided by its own length ``|y|``
    (Eq. 18-19), and sequences are then averaged by the caller with the global sequence
    count (:func:`aligndistil.losses.reductions.sequence_mean`).

    Args:
        policy_logits: ``(B, T, V)`` policy logits aligned to the response tokens.
        teacher_logits: ``(B, T, V)`` composite teacher logits
            (:func:`aligndistil_teacher_logits`).
        mask: ``(B, T)`` response mask.
        alpha: the teacher's extrapolation weight in the contrastive form
            ``z_dpo + alpha (z_dpo - z_rev)``: a ``(B, T)`` tensor ``alpha_t`` (adaptive) or
            a float (contrastive: ``beta0/beta``, giving ``beta_t = beta``).
        beta0: the DPO models' coefficient (paper: 0.1), > 0.
        weighting: ``"beta_t"`` (paper, default) or ``"uniform"`` (every token weight 1;
            an explicit ablation option).
        beta: the vanilla teacher (Eq. 11): its RLHF weight is the constant ``beta``, which
            is NOT ``beta0 / alpha`` for that teacher's ``alpha = beta0/beta - 1``; pass
            ``beta`` instead of ``alpha`` and every token is weighted by ``beta``.

    Returns:
        ``losses (B,)`` and detached metrics: ``teacher_kl`` (per-sequence mean of the
        unweighted reverse KL), ``alpha/mean`` (per-sequence mean ``alpha_t``),
        ``response_length``.
    """
    check_logits("policy_logits", policy_logits, "mask", mask)
    if teacher_logits.shape != policy_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match policy_logits {tuple(policy_logits.shape)}"
        )
    check_finite("teacher_logits", teacher_logits)
    weights = token_weights(alpha, beta0, weighting, mask, beta=beta)
    if alpha is None:
        alpha = beta0 / beta if beta is not None else 1.0  # reported as alpha/mean only
    logp = F.log_softmax(policy_logits, dim=-1)
    logq = F.log_softmax(teacher_logits.detach(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T) reverse KL per token
    return aligndistil_loss_from_token_kl(kl, mask, weights, alpha)


def aligndistil_loss_from_token_kl(
    token_kl: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, alpha: torch.Tensor | float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Length-normalised weighted sum of per-token reverse KL ``(B, T) -> (B,)`` (fused path entry)."""
    lengths = mask.sum(-1)
    losses = (weights * token_kl * mask).sum(-1) / lengths
    a = torch.as_tensor(alpha, dtype=mask.dtype, device=mask.device).detach()
    alpha_mean = (a * mask).sum(-1) / lengths if a.dim() > 0 else a.expand(mask.shape[0])
    return losses, {
        "teacher_kl": ((token_kl.detach() * mask).sum(-1) / lengths),
        "alpha/mean": alpha_mean,
        "response_length": lengths.detach(),
    }
