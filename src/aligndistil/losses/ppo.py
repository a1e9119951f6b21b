"""PPO's clipped policy and value losses ("Proximal Policy Optimization Algorithms", Schulman et al. 2017).

Per response token ``t``, with ``rho_t = pi_theta(y_t|s_t) / pi_old(y_t|s_t)`` (``pi_old``:
the policy that sampled the rollout) and a detached advantage ``A_t``
(:func:`aligndistil.losses.online.gae_advantages`):

- policy (Eq. 7, as a loss): ``l_t = max(-rho_t A_t, -clip(rho_t, 1 - eps, 1 + eps) A_t)``;
- value, clipped around the rollout's values ``V_old`` as TRL and OpenRLHF do:
  ``l_t = 1/2 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - G_t)^2)``.

RTO ("DPO Meets PPO", Zhong et al. 2024) is the same two losses on a different reward
(:func:`aligndistil.losses.online.token_rewards`); nothing here changes for it.

Normalisation. Both functions return ``(B,)`` unreduced losses, as every loss of the
package does, in one of two forms:

- ``normalisation="token"`` (default): each row's SUM over its tokens. The caller divides the
  step's total by the GLOBAL number of response tokens
  (``aligndistil.losses.reductions.sequence_mean(losses, num_tokens)``), which is the
  per-token mean of TRL's PPO trainer and of OpenRLHF's ``token_level_loss=True`` (their
  mean is over one micro-batch; the global count keeps it exact under accumulation and
  data parallelism).
- ``normalisation="sequence"``: each row's MEAN over its tokens, to be divided by the
  global number of sequences (OpenRLHF's ``token_level_loss=False``).
"""

from __future__ import annotations

import torch

from aligndistil.losses.checks import check_positive
from aligndistil.losses.online import check_token_stats, zero_off

NORMALISATIONS = ("token", "sequence")


def _check(mask: torch.Tensor, normalisation: str, **tensors: torch.Tensor) -> None:
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    check_token_stats(mask, **tensors)


def _per_row(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_off(per_token, mask).sum(-1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, normalisation: str) -> torch.Tensor:
    total = _per_row(per_token, mask)
    return total if normalisation == "token" else total / mask.sum(-1)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    normalisation: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate as a loss, per sequence (Schulman et al. 2017, Eq. 7).

    ``l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - cliprange, 1 + cliprange))``,
    ``rho_t = exp(logps_t - old_logps_t)``. Where the clipped branch is the larger one the
    token sends no gradient (the update has moved ``rho_t`` far enough in ``A_t``'s
    direction).

    Args:
        logps: ``(B, T)`` ``log pi_theta(y_t|s_t)`` now (differentiable; plain or fused path).
        old_logps: ``(B, T)`` the same at rollout time (detached here).
        advantages: ``(B, T)`` ``A_t`` (detached here), whitened or not.
        mask: ``(B, T)`` response mask.
        cliprange: ``eps > 0`` (TRL ``cliprange``, OpenRLHF ``eps_clip``; 0.2).
        normalisation: ``"token"`` (per-row sums, divide by the global token count) or
            ``"sequence"`` (per-row means); see the module docstring.

    Returns:
        ``losses (B,)`` and detached per-sequence metrics (means over the row's tokens):
        ``policy/clipfrac`` (fraction of tokens whose clipped branch is active),
        ``policy/approx_kl`` (``1/2 (log rho_t)^2``, TRL's ``approxkl``), ``policy/ratio``
        and ``response_length``.
    """
    check_positive("cliprange", cliprange)
    _check(mask, normalisation, logps=logps, old_logps=old_logps, advantages=advantages)
    adv = zero_off(advantages.detach(), mask)
    log_ratio = zero_off(logps, mask) - zero_off(old_logps.detach(), mask)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    losses = _reduce(per_token, mask, normalisation)
    with torch.no_grad():
        n = mask.sum(-1)
        metrics = {
            "policy/clipfrac": _per_row((clipped > unclipped).to(per_token.dtype), mask) / n,
            "policy/approx_kl": _per_row(0.5 * log_ratio**2, mask) / n,
            "policy/ratio": _per_row(ratio, mask) / n,
            "response_length": n,
        }
    return losses, {k: v.detach() for k, v in metrics.items()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float | None = 0.2,
    normalisation: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's clipped squared error, per sequence.

    ``l_t = 1/2 max((V_t - G_t)^2, (Vc_t - G_t)^2)`` with
    ``Vc_t = V_old,t + clip(V_t - V_old,t, -cliprange_value, cliprange_value)``: a value that
    moved more than ``cliprange_value`` from its rollout value is judged at the clipped
    value too and the worse of the two counts. ``cliprange_value=None``: ``1/2 (V_t - G_t)^2``.

    Args:
        values: ``(B, T)`` the critic's ``V(s_t)`` now (differentiable).
        old_values: ``(B, T)`` the critic's values at rollout time (detached here).
        returns: ``(B, T)`` the targets ``G_t = A_t + V_old,t`` of :func:`gae_advantages`.
        mask: ``(B, T)`` response mask.
        cliprange_value: ``> 0`` or None (TRL ``cliprange_value``, OpenRLHF ``value_clip``).
        normalisation: as :func:`ppo_policy_loss`.

    Returns:
        ``losses (B,)`` (the 1/2 included; the caller weights it, e.g. TRL's ``vf_coef``) and
        detached per-sequence metrics: ``value/clipfrac``, ``value/mean``, ``value/error``
        (mean unclipped squared error).
    """
    if cliprange_value is not None:
        check_positive("cliprange_value", cliprange_value)
    _check(mask, normalisation, values=values, old_values=old_values, returns=returns)
    values = zero_off(values, mask)
    old, target = zero_off(old_values.detach(), mask), zero_off(returns.detach(), mask)
    err = (values - target) ** 2
    if cliprange_value is None:
        per_token = 0.5 * err
        clipped_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clipped = old + (values - old).clamp(-cliprange_value, cliprange_value)
        err_clipped = (v_clipped - target) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
        clipped_active = err_clipped > err
    losses = _reduce(per_token, mask, normalisation)
    with torch.no_grad():
        n = mask.sum(-1)
        metrics = {
            "value/clipfrac": _per_row(clipped_active.to(err.dtype), mask) / n,
            "value/mean": _per_row(values, mask) / n,
            "value/error": _per_row(err, mask) / n,
        }
    return losses, {k: v.detach() for k, v in metrics.items()}
