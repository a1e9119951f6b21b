"""SparsePO and MaPO: token masks on TDPO's reward and KL terms ("SparsePO: Controlling Preference
Alignment of LLMs via Sparse Token Masks", Christopoulou et al. 2024, Sec. 2.2-2.3).

SparsePO weights each token's reward contribution by ``m_u(t) >= 0`` and each token's
forward-KL contribution by ``m_d(t) >= 0`` (Eq. 6 and the ``D_MaskKL`` definition below it);
with ``m_u = m_d = 1`` it is exactly TDPO1. The masks come from the REFERENCE model:

- :class:`SparsePOMask`, learned: one linear+ReLU per layer over the reference hidden
  states, merged across layers by a linear+ReLU (§2.3 "Learnable Sparse Mask");
- :func:`mapo_mask`, parameter-free: standardised mean activations of the reference model,
  averaged over hooked activations and min-max rescaled to ``[0, 1]`` (§2.3 "MaPO").

Masks are per response token and must be aligned the same way as the logits (the hidden
state at the position that PREDICTS token ``t``), so pass hidden states through
:func:`aligndistil.model.outputs.align_to_response` first.

The per-token statistics are TDPO's (:func:`aligndistil.losses.tdpo.pair_token_stats` on
logits, :func:`aligndistil.losses.fused.token_level_stats` fused); the composition, with
its validation, lives once in :func:`sparsepo_loss_from_stats`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from aligndistil.losses.checks import check_mask, check_nonnegative, check_positive
from aligndistil.losses.tdpo import pair_token_stats, token_level_dpo_from_stats

#: The default of both L1 weights ``lambda_u`` and ``lambda_d`` (paper: 1e-3).
#: ``method.lambda_u`` / ``method.lambda_d`` default to the same value: the config room
#: cannot import this one, so tests/losses/test_sparsepo.py checks that they agree.
L1_WEIGHT = 1e-3


def sparsepo_loss(
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_reward_mask: torch.Tensor,
    rejected_reward_mask: torch.Tensor,
    chosen_kl_mask: torch.Tensor,
    rejected_kl_mask: torch.Tensor,
    *,
    beta: float = 0.1,
    lambda_u: float = L1_WEIGHT,
    lambda_d: float = L1_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SparsePO (Eq. 6): ``-log sigma(u - delta) + lambda_u ||m_u||_1 + lambda_d ||m_d||_1``.

    - ``u = beta sum_t m_u(t) log pi_theta/pi_ref (y_w,t) - beta sum_t m_u(t) log pi_theta/pi_ref (y_l,t)``
    - ``delta = beta sum_t m_d(t) KL(pi_ref||pi_theta)(y_l,t) - beta sum_t m_d(t) KL(pi_ref||pi_theta)(y_w,t)``

    The L1 norms run over the pair's response tokens (chosen and rejected together), so
    each pair pays ``lambda * sum |m|`` for its own masks. Gradients flow into the masks
    (a learned mask trains with the policy).

    Args:
        policy_*_logits, reference_*_logits, *_labels, *_mask: as in
            :func:`aligndistil.losses.tdpo_loss`.
        chosen_reward_mask, rejected_reward_mask: ``m_u``, ``(B, Tw)`` and ``(B, Tl)``, >= 0.
        chosen_kl_mask, rejected_kl_mask: ``m_d``, same shapes, >= 0. Pass the same tensors
            as ``m_u`` for a shared mask.
        beta: > 0.  lambda_u, lambda_d: L1 weights >= 0 (default :data:`L1_WEIGHT`, the
            paper's 1e-3, as ``method.lambda_u`` / ``method.lambda_d``).

    Returns:
        ``losses (B,)`` and detached metrics: TDPO's, plus ``mask/sparsity`` (share of mask
        entries on response tokens that are exactly 0, reward and KL masks pooled) and
        ``mask/reward_mean``, ``mask/kl_mean``.
    """
    stats = pair_token_stats(policy_chosen_logits, policy_rejected_logits, reference_chosen_logits,
                             reference_rejected_logits, chosen_labels, rejected_labels, chosen_mask, rejected_mask)
    return sparsepo_loss_from_stats(
        *stats, chosen_mask, rejected_mask, chosen_reward_mask, rejected_reward_mask,
        chosen_kl_mask, rejected_kl_mask, beta=beta, lambda_u=lambda_u, lambda_d=lambda_d,
    )


def sparsepo_loss_from_stats(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
    chosen_kl, rejected_kl, chosen_mask, rejected_mask,
    chosen_reward_mask, rejected_reward_mask, chosen_kl_mask, rejected_kl_mask,
    *, beta: float = 0.1, lambda_u: float = L1_WEIGHT, lambda_d: float = L1_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`sparsepo_loss` from per-token statistics ``(B, T)`` (either producer's): checks the
    masks and weights, then TDPO's core with the masks plus the L1 terms."""
    check_positive("beta", beta)
    check_nonnegative("lambda_u", lambda_u)
    check_nonnegative("lambda_d", lambda_d)
    for name, m, ref in (
        ("chosen_reward_mask", chosen_reward_mask, chosen_mask),
        ("rejected_reward_mask", rejected_reward_mask, rejected_mask),
        ("chosen_kl_mask", chosen_kl_mask, chosen_mask),
        ("rejected_kl_mask", rejected_kl_mask, rejected_mask),
    ):
        if m.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(m.detach()).all() or bool((m.detach() < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
    losses, metrics = token_level_dpo_from_stats(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_kl, rejected_kl, chosen_mask, rejected_mask, beta=beta,
        chosen_reward_mask=chosen_reward_mask, rejected_reward_mask=rejected_reward_mask,
        chosen_kl_mask=chosen_kl_mask, rejected_kl_mask=rejected_kl_mask,
    )
    l1_u = (chosen_reward_mask.abs() * chosen_mask).sum(-1) + (rejected_reward_mask.abs() * rejected_mask).sum(-1)
    l1_d = (chosen_kl_mask.abs() * chosen_mask).sum(-1) + (rejected_kl_mask.abs() * rejected_mask).sum(-1)
    losses = losses + lambda_u * l1_u + lambda_d * l1_d
    metrics["mask/sparsity"] = mask_sparsity(
        [chosen_reward_mask, rejected_reward_mask, chosen_kl_mask, rejected_kl_mask],
        [chosen_mask, rejected_mask, chosen_mask, rejected_mask],
    ).reshape(1)
    n_u = chosen_mask.sum() + rejected_mask.sum()
    metrics["mask/reward_mean"] = ((chosen_reward_mask * chosen_mask).sum() + (rejected_reward_mask * rejected_mask).sum()).detach().reshape(1) / n_u
    metrics["mask/kl_mean"] = ((chosen_kl_mask * chosen_mask).sum() + (rejected_kl_mask * rejected_mask).sum()).detach().reshape(1) / n_u
    return losses, metrics


def mask_sparsity(masks: Sequence[torch.Tensor], response_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Share of mask entries on response tokens that are exactly 0 (the "mask sparsity" the paper reports)."""
    zeros = sum(((m.detach() == 0).float() * r).sum() for m, r in zip(masks, response_masks))
    total = sum(r.sum() for r in response_masks)
    return zeros / total


class SparsePOMask(nn.Module):
    """Learned SparsePO token mask(s) from reference hidden states (§2.3, "Learnable Sparse Mask").

    For each layer ``l``: ``m^(l)_t = ReLU(H^(l)_t . w^(l) + b^(l))`` (a scalar per token);
    merged: ``m_t = ReLU([m^(1)_t ... m^(L)_t] . w_o)``. With ``shared=False`` two such
    networks give independent reward and KL masks ``m_u`` and ``m_d``.

    Args:
        num_layers: how many hidden-state tensors are fed (for a HF model,
            ``len(outputs.hidden_states)``, i.e. embeddings + every layer).
        hidden_size: ``d``.
        shared: one mask for reward and KL (``m_u = m_d``) or two.

    Forward:
        ``hidden_states``: ``(L, B, T, d)`` tensor or a sequence of ``L`` tensors
        ``(B, T, d)``, already aligned to response tokens and detached (the reference model
        is frozen). Returns ``(m_u, m_d)``, each ``(B, T)`` and ``>= 0``.
    """

    def __init__(self, num_layers: int, hidden_size: int, shared: bool = True):
        super().__init__()
        if num_layers <= 0 or hidden_size <= 0:
            raise ValueError("num_layers and hidden_size must be > 0")
        self.num_layers, self.hidden_size, self.shared = num_layers, hidden_size, shared
        n_masks = 1 if shared else 2
        # Per-layer projections for all masks at once: weight (n_masks, L, d), bias (n_masks, L).
        self.layer_weight = nn.Parameter(torch.empty(n_masks, num_layers, hidden_size))
        self.layer_bias = nn.Parameter(torch.zeros(n_masks, num_layers))
        self.merge_weight = nn.Parameter(torch.empty(n_masks, num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so masks start near 1 and active (not all-zero after the ReLUs).

        Per-layer weights start small so ``m^(l)`` is close to its bias of 1; merge
        weights start at ``1/L`` so the merged mask starts close to 1, i.e. close to
        TDPO1, and sparsity is learned from there.
        """
        nn.init.normal_(self.layer_weight, std=0.02 / self.hidden_size ** 0.5)
        nn.init.constant_(self.layer_bias, 1.0)
        nn.init.constant_(self.merge_weight, 1.0 / self.num_layers)

    def forward(self, hidden_states) -> tuple[torch.Tensor, torch.Tensor]:
        H = hidden_states if isinstance(hidden_states, torch.Tensor) else torch.stack(list(hidden_states))
        if H.dim() != 4 or H.shape[0] != self.num_layers or H.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be (L={self.num_layers}, B, T, d={self.hidden_size}), got {tuple(H.shape)}"
            )
        H = H.to(self.layer_weight.dtype)
        # per_layer[k, l, b, t] = ReLU(H[l, b, t] . w[k, l] + b[k, l])
        per_layer = torch.relu(torch.einsum("lbtd,kld->klbt", H, self.layer_weight) + self.layer_bias[:, :, None, None])
        merged = torch.relu(torch.einsum("klbt,kl->kbt", per_layer, self.merge_weight))
        return (merged[0], merged[0]) if self.shared else (merged[0], merged[1])


def mapo_mask(activations: Sequence[torch.Tensor], mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MaPO activation mask (§2.3, "Model Activation-based Mask"), no parameters.

    For each hooked activation ``a_g`` ``(B, T, d_g)`` of the reference model (attention,
    MLP and residual outputs of every layer): average over the hidden dimension, then
    standardise over the sequence's response tokens; average the standardised values
    over all activations; finally min-max rescale over the sequence's response tokens
    to ``[0, 1]`` (the paper requires ``m in [0, 1]``; the authors' code rescales so).

    Args:
        activations: sequence of ``(B, T, d_g)`` tensors aligned to response tokens.
        mask: ``(B, T)`` response mask.
        eps: guards the standard deviation and the range. A sequence whose values are
            all equal (one token, or constant activations) carries no ranking, so it gets
            a mask of ones there, i.e. plain TDPO1 weighting.

    Returns:
        ``(B, T)`` mask in ``[0, 1]``, 0 on padding; shared for reward and KL (``m_u = m_d``).
    """
    if len(activations) == 0:
        raise ValueError("activations is empty: hook at least one reference activation")
    check_mask("mask", mask, activations[0].shape[:2])
    m = mask.to(activations[0].dtype)
    n = m.sum(-1, keepdim=True)
    total = torch.zeros_like(m)
    for i, a in enumerate(activations):
        if a.shape[:2] != mask.shape:
            raise ValueError(f"activations[{i}] has shape {tuple(a.shape)}, expected (B, T, d) with (B, T) = {tuple(mask.shape)}")
        s = a.detach().to(m.dtype).mean(-1)
        mean = (s * m).sum(-1, keepdim=True) / n
        var = (((s - mean) * m) ** 2).sum(-1, keepdim=True) / n
        total = total + (s - mean) / (var.sqrt() + eps)
    avg = total / len(activations)
    big = torch.finfo(avg.dtype).max
    lo = torch.where(m > 0, avg, torch.full_like(avg, big)).amin(-1, keepdim=True)
    hi = torch.where(m > 0, avg, torch.full_like(avg, -big)).amax(-1, keepdim=True)
    rng = hi - lo
    out = torch.where(rng > eps, (avg - lo) / rng.clamp(min=eps), torch.ones_like(avg))
    return out * m
