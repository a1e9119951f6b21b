"""TDPO: DPO with token-level forward-KL terms ("Token-level Direct Preference Optimization",
Zeng et al. 2024, Sec. 4.4).

TDPO keeps DPO's sequence-level reward margin ``u`` (Eq. 13) and subtracts the difference
of the two responses' sequential KL divergences ``delta`` (Eq. 14), where
``SeqKL(x, y) = sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))`` (Eq. 10) is a FORWARD KL
(reference first), computed exactly over the vocabulary at every response token.

Two layers. A STATISTICS PRODUCER turns logits into per-token label log-probs and forward
KL: :func:`pair_token_stats` on full logits, or
:func:`aligndistil.losses.fused.token_level_stats` chunk by chunk from hidden states and
head weights, never holding ``(B, T, V)``. The composition then lives once:
:func:`token_level_dpo_from_stats` is the shared core (SparsePO, :mod:`.sparsepo`, is the
same function with token masks, so TDPO1 is exactly SparsePO with masks of ones) and
:func:`tdpo_loss_from_stats` picks TDPO1 or TDPO2. :func:`tdpo_loss` is the plain
producer followed by that composition, which is what a reader checks against the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligndistil.losses.checks import check_labels, check_logits, check_nonnegative, check_positive
from aligndistil.losses.ops import label_logps, token_kl


def token_level_dpo_from_stats(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    stop_grad_chosen_kl: bool = False,
    chosen_reward_mask: torch.Tensor | None = None,
    rejected_reward_mask: torch.Tensor | None = None,
    chosen_kl_mask: torch.Tensor | None = None,
    rejected_kl_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-log sigma(u - alpha * delta)`` from per-token statistics (TDPO Eq. 15/17, SparsePO Eq. 6).

    Args:
        policy_chosen_logps, reference_chosen_logps: ``(B, Tw)`` ``log pi(y_w,t | s_t)``.
        policy_rejected_logps, reference_rejected_logps: ``(B, Tl)`` for ``y_l``.
        chosen_kl, rejected_kl: ``(B, Tw)``, ``(B, Tl)`` per-token
            ``KL(pi_ref(.|s_t) || pi_theta(.|s_t))``.
        chosen_mask, rejected_mask: response masks.
        beta: > 0.
        alpha: weight of ``delta`` (1 for TDPO1/SparsePO, TDPO2's ``alpha``).
        stop_grad_chosen_kl: TDPO2's ``sg(beta SeqKL(x, y_w))`` (Eq. 18).
        *_reward_mask, *_kl_mask: SparsePO's ``m_u`` and ``m_d`` (None means ones).

    Returns:
        ``losses (B,)`` and detached metrics: DPO-style ``rewards/*`` (the masked token
        rewards ``beta * sum_t m_u log pi_theta/pi_ref`` summed per response),
        ``logps/*``, and ``kl/chosen``, ``kl/rejected``: the unmasked ``SeqKL``.
    """
    check_positive("beta", beta)

    def wsum(x, mask, weight):
        w = mask if weight is None else mask * weight
        return (x * w).sum(dim=-1)

    chosen_rewards = beta * wsum(policy_chosen_logps - reference_chosen_logps, chosen_mask, chosen_reward_mask)
    rejected_rewards = beta * wsum(policy_rejected_logps - reference_rejected_logps, rejected_mask, rejected_reward_mask)
    u = chosen_rewards - rejected_rewards  # Eq. 13 (masked: SparsePO Eq. 6)
    chosen_seqkl = beta * wsum(chosen_kl, chosen_mask, chosen_kl_mask)
    rejected_seqkl = beta * wsum(rejected_kl, rejected_mask, rejected_kl_mask)
    if stop_grad_chosen_kl:
        chosen_seqkl = chosen_seqkl.detach()
    delta = rejected_seqkl - chosen_seqkl  # Eq. 14 (TDPO1) / Eq. 18 (TDPO2)
    losses = -F.logsigmoid(u - alpha * delta)
    cr, rj = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": cr,
        "rewards/rejected": rj,
        "rewards/accuracies": (cr > rj).float(),
        "rewards/margins": cr - rj,
        "logps/chosen": (policy_chosen_logps * chosen_mask).sum(-1).detach(),
        "logps/rejected": (policy_rejected_logps * rejected_mask).sum(-1).detach(),
        "kl/chosen": (chosen_kl * chosen_mask).sum(-1).detach(),
        "kl/rejected": (rejected_kl * rejected_mask).sum(-1).detach(),
    }
    return losses, metrics


def _check_pair_logits(policy_chosen_logits, policy_rejected_logits, reference_chosen_logits,
                       reference_rejected_logits, chosen_labels, rejected_labels, chosen_mask, rejected_mask):
    check_logits("policy_chosen_logits", policy_chosen_logits, "chosen_mask", chosen_mask)
    check_logits("policy_rejected_logits", policy_rejected_logits, "rejected_mask", rejected_mask)
    check_logits("reference_chosen_logits", reference_chosen_logits, "chosen_mask", chosen_mask)
    check_logits("reference_rejected_logits", reference_rejected_logits, "rejected_mask", rejected_mask)
    if reference_chosen_logits.shape != policy_chosen_logits.shape:
        raise ValueError("reference_chosen_logits and policy_chosen_logits differ in shape")
    if reference_rejected_logits.shape != policy_rejected_logits.shape:
        raise ValueError("reference_rejected_logits and policy_rejected_logits differ in shape")
    if policy_chosen_logits.shape[0] != policy_rejected_logits.shape[0]:
        raise ValueError(
            f"policy_chosen_logits has batch size {policy_chosen_logits.shape[0]} but "
            f"policy_rejected_logits has {policy_rejected_logits.shape[0]}"
        )
    V = policy_chosen_logits.shape[-1]
    check_labels("chosen_labels", chosen_labels, "chosen_mask", chosen_mask, V)
    check_labels("rejected_labels", rejected_labels, "rejected_mask", rejected_mask, V)


def pair_token_stats(policy_chosen_logits, policy_rejected_logits, reference_chosen_logits,
                     reference_rejected_logits, chosen_labels, rejected_labels, chosen_mask, rejected_mask):
    """Plain statistics producer: label log-probs and forward ``KL(pi_ref || pi_theta)`` per token.

    Args: as :func:`tdpo_loss` (logits ``(B, T, V)``, labels and masks ``(B, T)``); the same
    as :func:`aligndistil.losses.fused.token_level_stats` with full logits for ``HeadRows``.

    Returns:
        ``(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_kl, rejected_kl)``, each ``(B, T)``: the first
        arguments of :func:`token_level_dpo_from_stats`. No gradient reaches the reference.
    """
    _check_pair_logits(policy_chosen_logits, policy_rejected_logits, reference_chosen_logits,
                       reference_rejected_logits, chosen_labels, rejected_labels, chosen_mask, rejected_mask)
    ref_c = reference_chosen_logits.detach()
    ref_r = reference_rejected_logits.detach()
    return (
        label_logps(policy_chosen_logits, chosen_labels),
        label_logps(policy_rejected_logits, rejected_labels),
        label_logps(ref_c, chosen_labels),
        label_logps(ref_r, rejected_labels),
        token_kl(ref_c, policy_chosen_logits),
        token_kl(ref_r, policy_rejected_logits),
    )


def tdpo_loss_from_stats(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
    chosen_kl, rejected_kl, chosen_mask, rejected_mask, *, variant: int, beta: float = 0.1, alpha: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TDPO1 (Eq. 15) or TDPO2 (Eq. 17-18) from per-token statistics ``(B, T)`` (either producer's).

    TDPO1 is :func:`token_level_dpo_from_stats` with ``alpha = 1``; TDPO2 weights ``delta2``
    by ``alpha`` and stops the gradient of the chosen response's ``SeqKL``. ``variant`` is
    required, never defaulted; ``alpha`` is checked (>= 0) for both variants.
    """
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2 (TDPO1 or TDPO2), got {variant!r}")
    check_nonnegative("alpha", alpha)
    return token_level_dpo_from_stats(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_kl, rejected_kl, chosen_mask, rejected_mask, beta=beta,
        alpha=1.0 if variant == 1 else alpha, stop_grad_chosen_kl=(variant == 2),
    )


def tdpo_loss(
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    variant: int,
    beta: float = 0.1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TDPO1 (Eq. 15) or TDPO2 (Eq. 17-18) on aligned logits; ``variant`` is required, never defaulted.

    - ``u = beta sum_t log pi_theta/pi_ref (y_w,t) - beta sum_t log pi_theta/pi_ref (y_l,t)`` (Eq. 13)
    - TDPO1: ``-log sigma(u - delta)``, ``delta = beta SeqKL(x, y_l) - beta SeqKL(x, y_w)`` (Eq. 14)
    - TDPO2: ``-log sigma(u - alpha delta2)``,
      ``delta2 = beta SeqKL(x, y_l) - sg(beta SeqKL(x, y_w))`` (Eq. 18)

    with ``SeqKL(x, y) = sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))`` (Eq. 10, forward KL).
    :func:`pair_token_stats` then :func:`tdpo_loss_from_stats`.

    Args:
        policy_chosen_logits: ``(B, Tw, V)`` policy logits aligned to ``y_w`` tokens.
        policy_rejected_logits: ``(B, Tl, V)`` aligned to ``y_l``.
        reference_chosen_logits, reference_rejected_logits: the same for ``pi_ref`` (no
            gradient flows into them).
        chosen_labels, rejected_labels: ``(B, Tw)``, ``(B, Tl)`` response token ids.
        chosen_mask, rejected_mask: ``(B, Tw)``, ``(B, Tl)`` response masks.
        variant: 1 or 2.
        beta: > 0 (paper: 0.1).
        alpha: TDPO2's weight on ``delta2`` (paper: 0.5); ignored by TDPO1.

    Returns:
        ``losses (B,)`` and detached metrics (see :func:`token_level_dpo_from_stats`).
    """
    stats = pair_token_stats(policy_chosen_logits, policy_rejected_logits, reference_chosen_logits,
                             reference_rejected_logits, chosen_labels, rejected_labels, chosen_mask, rejected_mask)
    return tdpo_loss_from_stats(*stats, chosen_mask, rejected_mask, variant=variant, beta=beta, alpha=alpha)
