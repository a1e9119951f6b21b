"""Sequence-level preference losses: DPO, reverse DPO, IPO, SimPO, DPOP and KTO.

These are the baselines the token-level papers compare against. They only need the
log-probability of each response token, so they take per-token log-probs ``(B, T)`` with a
response mask (the output of :func:`aligndistil.losses.ops.label_logps` on aligned logits), or
already-summed sequence log-probs ``(B,)`` when the mask is ``None``.

Every function returns ``(losses, metrics)``: ``losses`` is ``(B,)``, one value per pair
(or per example for KTO), NOT reduced, so the caller can normalise by the global number of
sequences (see :mod:`aligndistil.losses.reductions`); ``metrics`` holds detached per-pair
tensors named after the ecosystem's conventions (``rewards/chosen`` ...), which the trainer
averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligndistil.losses.checks import check_finite, check_nonnegative, check_positive, check_same_shape, check_token_logps


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``log pi(y|x) = sum_t log pi(y_t|s_t)`` over response tokens: ``(B, T) -> (B,)``.

    With ``mask=None`` the input is taken to be already summed, shape ``(B,)``.
    """
    if mask is None:
        return token_logps
    return (token_logps * mask).sum(dim=-1)


def _pair_logps(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
    chosen_mask, rejected_mask,
):
    check_token_logps("policy_chosen_logps", policy_chosen_logps, chosen_mask, "chosen_mask")
    check_token_logps("policy_rejected_logps", policy_rejected_logps, rejected_mask, "rejected_mask")
    check_token_logps("reference_chosen_logps", reference_chosen_logps, chosen_mask, "chosen_mask")
    check_token_logps("reference_rejected_logps", reference_rejected_logps, rejected_mask, "rejected_mask")
    check_same_shape(policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    check_same_shape(policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps)
    if policy_chosen_logps.shape[0] != policy_rejected_logps.shape[0]:
        raise ValueError(
            f"policy_chosen_logps has batch size {policy_chosen_logps.shape[0]} but "
            f"policy_rejected_logps has {policy_rejected_logps.shape[0]}"
        )
    return (
        sequence_logps(policy_chosen_logps, chosen_mask),
        sequence_logps(policy_rejected_logps, rejected_mask),
        sequence_logps(reference_chosen_logps, chosen_mask),
        sequence_logps(reference_rejected_logps, rejected_mask),
    )


def _pair_metrics(beta, pc, pr, rc, rr):
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    reverse: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log sigma(beta * (Delta_theta - Delta_ref))``.

    ``Delta_m = log pi_m(y_w|x) - log pi_m(y_l|x)`` with sequence log-probs summed over
    response tokens.

    Args:
        policy_chosen_logps: ``(B, Tw)`` per-token log-probs of ``y_w`` under the policy,
            or ``(B,)`` sequence sums when ``chosen_mask`` is None.
        policy_rejected_logps: ``(B, Tl)`` (or ``(B,)``) for ``y_l``.
        reference_chosen_logps, reference_rejected_logps: the same under ``pi_ref``.
        chosen_mask, rejected_mask: ``(B, Tw)``, ``(B, Tl)`` response masks, or None.
        beta: KL coefficient, > 0 (paper: 0.1).
        reverse: train reverse DPO, i.e. swap ``y_w`` and ``y_l`` (the ``pi_rev`` of
            AlignDistil's contrastive reward). Metrics are then reported for the swapped
            pair, so ``rewards/chosen`` is the reward of the response being promoted.

    Returns:
        ``losses (B,)`` and detached metrics ``rewards/{chosen,rejected,accuracies,margins}``,
        ``logps/{chosen,rejected}``, each ``(B,)``.
    """
    check_positive("beta", beta)
    if reverse:
        return dpo_loss(
            policy_rejected_logps, policy_chosen_logps, reference_rejected_logps,
            reference_chosen_logps, rejected_mask, chosen_mask, beta=beta, reverse=False,
        )
    pc, pr, rc, rr = _pair_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_mask, rejected_mask,
    )
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits)
    return losses, _pair_metrics(beta, pc, pr, rc, rr)


#: ``logps`` values of :func:`ipo_loss` (``method.ipo_logps``): how per-token log-probs make
#: the sequence log-probs inside ``h``.
IPO_LOGPS = ("sum", "mean")


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    logps: str = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al. 2024, the empirical IPO loss): ``(h - 1/(2 beta))^2``, ``h = Delta_theta - Delta_ref``.

    ``beta`` is IPO's regularisation ``tau`` (> 0). ``logps`` says what ``log pi(y|x)`` is
    inside ``Delta_m = log pi_m(y_w|x) - log pi_m(y_l|x)``:

    - ``"sum"`` (the default): the sum over response tokens, the sequence log-probability
      ``log pi(y|x)`` of the IPO paper's formula read literally;
    - ``"mean"``: the mean over response tokens, TRL's ``loss_type="ipo"`` (its code notes
      that the IPO authors confirmed the mean). When both responses have ``n`` tokens this
      is the sum form with ``h / n`` in place of ``h``; otherwise the two weigh the chosen
      and rejected log-ratios differently.

    Shapes as in :func:`dpo_loss`; ``"mean"`` needs the masks (per-token log-probs).
    Returns ``losses (B,)`` and the DPO-style metrics, on the same (summed or averaged)
    log-probs.
    """
    check_positive("beta", beta)
    if logps not in IPO_LOGPS:
        raise ValueError(f"logps must be one of {', '.join(IPO_LOGPS)}, got {logps!r}")
    if logps == "mean" and (chosen_mask is None or rejected_mask is None):
        raise ValueError("logps='mean' needs per-token log-probs with their masks (chosen_mask, rejected_mask)")
    pc, pr, rc, rr = _pair_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_mask, rejected_mask,
    )
    if logps == "mean":
        n_c, n_r = chosen_mask.sum(-1).clamp_min(1), rejected_mask.sum(-1).clamp_min(1)
        pc, rc, pr, rr = pc / n_c, rc / n_c, pr / n_r, rr / n_r
    h = (pc - pr) - (rc - rr)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, _pair_metrics(beta, pc, pr, rc, rr)


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-Positive (Pal et al. 2024, "Smaug"; lambda = 50).

    ``-log sigma(beta * (Delta_theta - Delta_ref - lambda * max(0, log pi_ref(y_w|x) -
    log pi_theta(y_w|x))))``: the extra term penalises any drop of the chosen response's
    likelihood below the reference's. Paper: ``lambda = 50``.

    Shapes as in :func:`dpo_loss`. Returns ``losses (B,)`` and the DPO-style metrics plus
    ``dpop/penalty`` ``(B,)``.
    """
    check_positive("beta", beta)
    check_nonnegative("lambda_", lambda_)
    pc, pr, rc, rr = _pair_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_mask, rejected_mask,
    )
    penalty = torch.clamp(rc - pc, min=0.0)
    losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr) - lambda_ * penalty))
    metrics = _pair_metrics(beta, pc, pr, rc, rr)
    metrics["dpop/penalty"] = penalty.detach()
    return losses, metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    beta: float = 10.0,
    gamma: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised.

    ``-log sigma((beta/|y_w|) log pi(y_w|x) - (beta/|y_l|) log pi(y_l|x) - gamma)``.
    The paper's setting, the defaults here: ``beta = 10``, ``gamma / beta = 0.5`` so ``gamma = 5``.

    Args:
        policy_chosen_logps: ``(B, Tw)`` per-token log-probs of ``y_w``.
        policy_rejected_logps: ``(B, Tl)`` per-token log-probs of ``y_l``.
        chosen_mask, rejected_mask: response masks; ``|y|`` is their row sum.

    Returns:
        ``losses (B,)``; metrics ``rewards/*`` are the length-normalised rewards
        ``beta/|y| log pi(y|x)``, and ``logps/*`` the summed log-probs.
    """
    check_positive("beta", beta)
    check_token_logps("policy_chosen_logps", policy_chosen_logps, chosen_mask, "chosen_mask")
    check_token_logps("policy_rejected_logps", policy_rejected_logps, rejected_mask, "rejected_mask")
    if policy_chosen_logps.shape[0] != policy_rejected_logps.shape[0]:
        raise ValueError(
            f"policy_chosen_logps has batch size {policy_chosen_logps.shape[0]} but "
            f"policy_rejected_logps has {policy_rejected_logps.shape[0]}"
        )
    pc = sequence_logps(policy_chosen_logps, chosen_mask)
    pr = sequence_logps(policy_rejected_logps, rejected_mask)
    chosen_rewards = beta * pc / chosen_mask.sum(-1)
    rejected_rewards = beta * pr / rejected_mask.sum(-1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    cr, rj = chosen_rewards.detach(), rejected_rewards.detach()
    return losses, {
        "rewards/chosen": cr,
        "rewards/rejected": rj,
        "rewards/accuracies": (cr > rj).float(),
        "rewards/margins": cr - rj,
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor | None,
    desirable: torch.Tensor,
    kl_reference_point: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024), for unpaired examples.

    With ``r = log pi_theta(y|x) - log pi_ref(y|x)`` (sequence sums) and reference point
    ``z0`` (an estimate of ``KL(pi_theta || pi_ref)``, detached and clamped at 0):
    desirable ``y``: ``lambda_D * (1 - sigma(beta * (r - z0)))``;
    undesirable ``y``: ``lambda_U * (1 - sigma(beta * (z0 - r)))``.

    Args:
        policy_logps, reference_logps: ``(B, T)`` per-token log-probs (or ``(B,)`` sums
            when ``mask`` is None).
        mask: ``(B, T)`` response mask or None.
        desirable: ``(B,)`` bool, the example's label.
        kl_reference_point: ``z0``, a scalar; the trainer estimates it from mismatched
            prompt/completion pairs in the batch, as the KTO paper does. No gradient flows
            through it.
        beta, desirable_weight, undesirable_weight: KTO's ``beta``, ``lambda_D``, ``lambda_U``.

    Returns:
        ``losses (B,)``; metrics ``rewards/chosen`` and ``rewards/rejected`` hold the
        rewards ``beta * r`` of desirable / undesirable examples (NaN-free: empty groups
        are simply absent from the tensors), and ``kl`` the reference point used.
    """
    check_positive("beta", beta)
    check_token_logps("policy_logps", policy_logps, mask, "mask")
    check_token_logps("reference_logps", reference_logps, mask, "mask")
    check_same_shape(policy_logps=policy_logps, reference_logps=reference_logps)
    desirable = desirable.bool()
    if desirable.shape != policy_logps.shape[:1]:
        raise ValueError(f"desirable must be (B,) = ({policy_logps.shape[0]},), got {tuple(desirable.shape)}")
    z0 = torch.as_tensor(kl_reference_point, dtype=policy_logps.dtype, device=policy_logps.device)
    check_finite("kl_reference_point", z0)
    z0 = z0.detach().clamp(min=0.0)
    r = sequence_logps(policy_logps, mask) - sequence_logps(reference_logps, mask)
    losses = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = (beta * r).detach()
    return losses, {
        "rewards/chosen": rewards[desirable],
        "rewards/rejected": rewards[~desirable],
        "kl": z0.reshape(1),
    }
