"""AlignDistil: RLHF with a DPO reward as token-level distillation ("AlignDistil", Zhang et al. 2025, Sec. 3-4).

Theorem 1 (Eq. 11) shows that RLHF with the DPO reward ``beta0 log pi_dpo/pi_ref`` and KL
weight ``beta`` is, per state, a reverse-KL distillation of the policy toward a teacher
whose logits mix the DPO model's and the reference's. With the contrastive reward
``beta0 log pi_dpo/pi_rev`` (Eq. 12-15) the teacher extrapolates the DPO model away from
the reverse-DPO model; the token-adaptive variant (Eq. 16-17) uses a per-token weight
``alpha_t = r * TVD(pi_dpo, pi_rev) + eps``.

All three teachers have one form, ``base + alpha * (base - negative)``
(:func:`aligndistil.losses.ops.teacher_logits`):

========================  ========  ===========  ==========================
teacher                   base      negative     alpha (:mod:`.ops`)
========================  ========  ===========  ==========================
vanilla (Eq. 11)          dpo       ref          ``beta0/beta - 1``
contrastive (Eq. 15)      dpo       reverse dpo  ``beta0/beta``
adaptive (Eq. 17)         dpo       reverse dpo  ``r * TVD_t + eps``
========================  ========  ===========  ==========================

The loss (Eq. 18 on-policy, Eq. 19 off-policy) is the EXACT reverse KL
``KL(pi_theta || softmax(z*))`` summed over the vocabulary at each response token, weighted
per token by ``beta_t = beta0 / alpha_t`` and normalised by the response length.

Two layers, as for TDPO and SparsePO. A STATISTICS PRODUCER turns logits into per-token
statistics ``(kl, alpha, tvd)``: :func:`aligndistil_token_stats` here on full logits, or
:func:`aligndistil.losses.fused.aligndistil_token_stats` chunk by chunk from hidden states
and head weights. :func:`aligndistil_loss_from_stats` is the one composition (weights
``beta_t``, length normalisation, metrics) both paths share; :func:`aligndistil_loss` is the
plain composition for a teacher the caller has already built.
"""

from __future__ import annotations

import torch

from aligndistil.losses import ops
from aligndistil.losses.checks import check_adaptive, check_finite, check_logits, check_positive, check_teacher_pair
from aligndistil.losses.ops import adaptive_alpha, contrastive_alpha, vanilla_alpha  # noqa: F401  (public here too)

WEIGHTINGS = ("beta_t", "uniform")


def aligndistil_teacher_logits(
    base_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    alpha: torch.Tensor | float,
) -> torch.Tensor:
    """Composite teacher logits ``z* = base + alpha * (base - negative)`` (Eq. 11, 15, 17), checked.

    Args:
        base_logits: ``(B, T, V)`` the DPO model's aligned logits ``z^dpo``.
        negative_logits: ``(B, T, V)`` ``z^ref`` (vanilla) or ``z^rev`` (contrastive, adaptive).
        alpha: a float (vanilla: ``beta0/beta - 1``; contrastive: ``beta0/beta``) or a
            ``(B, T)`` tensor of per-token ``alpha_t`` (adaptive, :func:`adaptive_alpha`).

    Returns:
        ``(B, T, V)`` teacher logits, detached (teachers carry no gradient).
    """
    check_teacher_pair("base_logits", base_logits, "negative_logits", negative_logits)
    alpha = _checked_alpha(alpha, base_logits.shape[:-1])
    return ops.teacher_logits(base_logits.detach(), negative_logits.detach(), alpha)


def _checked_alpha(alpha: torch.Tensor | float, shape: torch.Size) -> torch.Tensor | float:
    """A finite float, or a finite detached per-token tensor of ``shape``."""
    if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
        if alpha.shape != shape:
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected {tuple(shape)} or a scalar")
        check_finite("alpha", alpha)
        return alpha.detach()
    a = float(alpha)
    if a != a or a in (float("inf"), float("-inf")):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return a


def resolve_alpha(alpha, *, r: float | None, eps: float, tvd: torch.Tensor | None,
                  mask: torch.Tensor) -> torch.Tensor | float | None:
    """The teacher's ``alpha`` as both statistics producers take it.

    A given ``alpha`` (float or ``(B, T)``) is checked and returned. Without one the teacher
    is adaptive: ``r`` and ``eps`` are checked, and a precomputed ``tvd`` ``(B, T)`` (the
    teacher cache's) gives ``alpha_t = r * tvd + eps``; with no ``tvd`` either, None: the
    producer computes the TVD from the teachers' logits.
    """
    if alpha is not None:
        return _checked_alpha(alpha, mask.shape)
    check_adaptive(r, eps)
    if tvd is None:
        return None
    if tvd.shape != mask.shape:
        raise ValueError(f"tvd has shape {tuple(tvd.shape)}, expected {tuple(mask.shape)}")
    return ops.alpha_from_tvd(tvd.detach().to(mask.dtype), r, eps)


def aligndistil_token_stats(
    policy_logits: torch.Tensor,
    base_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: torch.Tensor | float | None = None,
    r: float | None = None,
    eps: float = 1e-3,
    tvd: torch.Tensor | None = None,
):
    """Plain statistics producer: per-token ``KL(pi_theta || softmax(z*))``, ``z* = z_base + alpha (z_base - z_neg)``.

    Same arguments and results as :func:`aligndistil.losses.fused.aligndistil_token_stats`
    with full logits for :class:`~aligndistil.losses.fused.HeadRows`.

    Args:
        policy_logits: ``(B, T, V)`` aligned policy logits (the gradient flows here only).
        base_logits, negative_logits: ``(B, T, V)`` the DPO model's and the negative model's
            (reverse DPO, or the reference for the vanilla teacher).
        mask: ``(B, T)`` response mask.
        alpha: a float, a ``(B, T)`` tensor, or None for the adaptive teacher
            (``alpha_t = r * TVD + eps``, Eq. 16), the TVD taken from ``tvd`` when given.
        r, eps: the adaptive teacher's bound and floor.
        tvd: ``(B, T)`` precomputed ``TVD(pi_base, pi_neg)`` (teacher cache), or None.

    Returns:
        ``kl (B, T)`` (differentiable), ``alpha`` (as given, or the adaptive ``(B, T)``) and
        ``tvd (B, T)`` for the adaptive teacher (else None), both detached.
    """
    check_logits("policy_logits", policy_logits, "mask", mask)
    check_teacher_pair("base_logits", base_logits, "negative_logits", negative_logits)
    if base_logits.shape != policy_logits.shape:
        raise ValueError(f"base_logits {tuple(base_logits.shape)} must match policy_logits {tuple(policy_logits.shape)}")
    adaptive = alpha is None
    alpha = resolve_alpha(alpha, r=r, eps=eps, tvd=tvd, mask=mask)
    base, neg = base_logits.detach(), negative_logits.detach()
    if alpha is None:
        with torch.no_grad():
            tvd = ops.token_tvd(base, neg)
        alpha = ops.alpha_from_tvd(tvd, r, eps)
    kl = ops.token_kl(policy_logits, ops.teacher_logits(base, neg, alpha))
    return kl, alpha, (tvd if adaptive else None)


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


def kl_row_weight(mask: torch.Tensor, *, alpha: torch.Tensor | float | None = None, beta0: float = 0.1,
                  weighting: str = "beta_t", beta: float | None = None) -> dict:
    """The gradient :func:`aligndistil_loss_from_stats` sends each token's KL, for the fused shortcut.

    ``losses_b = sum_t w_bt kl_bt mask_bt / |y_b|`` is linear in ``kl``, so
    ``d losses_b / d kl_bt = w_bt mask_bt / |y_b|`` with the weights of :func:`token_weights`.
    The adaptive teacher's ``w = beta0 / alpha_t`` is known only once the chunk has computed
    ``alpha_t``: then the row weight is ``beta0 mask / |y|`` and ``row_weight_over_alpha``
    says that the chunk divides it by ``alpha_t``.

    Returns:
        ``{"row_weight": (B, T), "row_weight_over_alpha": bool}``: keyword arguments of
        :func:`aligndistil.losses.fused.aligndistil_token_stats`.
    """
    over_alpha = alpha is None and beta is None and weighting == "beta_t"
    w = token_weights(1.0 if alpha is None else alpha, beta0, weighting, mask, beta=beta)
    return {"row_weight": w * mask / mask.sum(-1, keepdim=True), "row_weight_over_alpha": over_alpha}


def aligndistil_loss_from_stats(
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: torch.Tensor | float | None = None,
    beta0: float = 0.1,
    weighting: str = "beta_t",
    beta: float | None = None,
    tvd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AlignDistil loss per sequence from per-token statistics (Eq. 18 on-policy, Eq. 19 off-policy).

    ``L(y) = (1/|y|) sum_t beta_t * KL_t`` with ``beta_t = beta0 / alpha_t``. Each sequence's
    weighted KL sum is divided by its own length ``|y|`` (Eq. 18-19); the caller then averages
    sequences with the global sequence count (:func:`aligndistil.losses.reductions.sequence_mean`).

    Args:
        token_kl: ``(B, T)`` per-token reverse KL ``KL(pi_theta || softmax(z*))`` (a producer's).
        mask: ``(B, T)`` response mask.
        alpha: the teacher's extrapolation weight in the contrastive form
            ``z_dpo + alpha (z_dpo - z_rev)``: a ``(B, T)`` tensor ``alpha_t`` (adaptive) or
            a float (contrastive: ``beta0/beta``, giving ``beta_t = beta``).
        beta0: the DPO models' coefficient (paper: 0.1), > 0.
        weighting: ``"beta_t"`` (paper, default) or ``"uniform"`` (every token weight 1;
            an explicit ablation option).
        beta: the vanilla teacher (Eq. 11): its RLHF weight is the constant ``beta``, which
            is NOT ``beta0 / alpha`` for that teacher's ``alpha = beta0/beta - 1``; with
            ``beta`` every token is weighted by ``beta`` (``alpha`` is then only reported).
        tvd: ``(B, T)`` the adaptive teacher's ``TVD_t``, reported as ``tvd/mean``; or None.

    Returns:
        ``losses (B,)`` and detached metrics: ``teacher_kl`` (per-sequence mean of the
        unweighted KL), ``alpha/mean`` (per-sequence mean of the teacher's ``alpha_t``, the
        weight in ``z_dpo + alpha (z_dpo - z_neg)``: ``beta0/beta - 1`` for the vanilla
        teacher; 1 without alpha), ``response_length``, and ``tvd/mean`` when ``tvd`` is given.
    """
    check_positive("beta0", beta0)
    weights = token_weights(alpha, beta0, weighting, mask, beta=beta)
    lengths = mask.sum(-1)
    losses = (weights * token_kl * mask).sum(-1) / lengths
    # The teacher's own alpha, also for the vanilla teacher (whose token weight is beta, not
    # beta0/alpha): a logged alpha must be the one that built the teacher.
    shown = 1.0 if alpha is None else alpha
    a = torch.as_tensor(shown, dtype=mask.dtype, device=mask.device).detach()
    metrics = {
        "teacher_kl": (token_kl.detach() * mask).sum(-1) / lengths,
        "alpha/mean": (a * mask).sum(-1) / lengths if a.dim() > 0 else a.expand(mask.shape[0]),
        "response_length": lengths.detach(),
    }
    if tvd is not None:
        metrics["tvd/mean"] = (tvd * mask).sum(-1) / lengths
    return losses, metrics


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
    """AlignDistil loss per sequence (Eq. 18/19) toward a teacher already built.

    ``L(y) = (1/|y|) sum_t beta_t * KL(pi_theta(.|s_t) || softmax(z*_t))``: an exact REVERSE
    KL (student first, :func:`aligndistil.losses.ops.token_kl`) over the whole vocabulary,
    not a sampled estimate; ``z*`` carries no gradient. The composition (weights, metrics)
    is :func:`aligndistil_loss_from_stats`, which documents ``alpha``, ``beta0``,
    ``weighting`` and ``beta``.

    Args:
        policy_logits: ``(B, T, V)`` policy logits aligned to the response tokens.
        teacher_logits: ``(B, T, V)`` composite teacher logits
            (:func:`aligndistil_teacher_logits`).
        mask: ``(B, T)`` response mask.

    Returns:
        ``losses (B,)`` and detached metrics (``teacher_kl``, ``alpha/mean``, ``response_length``).
    """
    check_logits("policy_logits", policy_logits, "mask", mask)
    if teacher_logits.shape != policy_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match policy_logits {tuple(policy_logits.shape)}"
        )
    check_finite("teacher_logits", teacher_logits)
    kl = ops.token_kl(policy_logits, teacher_logits.detach())
    return aligndistil_loss_from_stats(kl, mask, alpha=alpha, beta0=beta0, weighting=weighting, beta=beta)
