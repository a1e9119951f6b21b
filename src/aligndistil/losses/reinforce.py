"""REINFORCE with the contrastive DPO reward, sentence- and token-level ("AlignDistil", Zhang et al. 2025, App. E).

The baselines of AlignDistil's convergence study (Sec. 6.5, Fig. 2). With the contrastive
reward ``r_ctr(x, y) = beta0 log pi_dpo(y|x)/pi_rev(y|x) = sum_t r_t``, token reward
``r_t = beta0 log pi_dpo(y_t|s_t)/pi_rev(y_t|s_t)``, responses ``y ~ pi_theta`` and a KL
weight ``beta`` toward ``pi_dpo`` (not ``pi_ref``):

- sentence level (Eq. 42): the bandit reward ``r_ctr`` on every token's score function,
  minus ``beta`` times the sequence log-ratio ``log pi_theta(y|x)/pi_dpo(y|x)``, times
  ``1/|y|``;
- token level (Eq. 43): the return ``G_t = sum_{i>=t} r_i`` on token ``t``'s score function,
  minus ``beta`` times the exact ``KL(pi_theta(.|s_t) || pi_dpo(.|s_t))`` over the
  vocabulary, times ``1/|y|``.

Eq. 42 as printed has a trap. Differentiated pathwise, its KL term
``-beta grad log pi_theta(y|x)/pi_dpo(y|x) = -beta grad log pi_theta(y|x)`` has expectation
zero under ``y ~ pi_theta``, so it would train with no KL at all. The objective it stands
for is ``J = E[r_ctr - beta log pi_theta(y|x)/pi_dpo(y|x)]`` (reward minus
``beta KL(pi_theta(y|x) || pi_dpo(y|x))``), whose gradient is
``E[(r_ctr - beta log pi_theta/pi_dpo) grad log pi_theta(y|x)]``: the log-ratio is a DETACHED
weight on the score function, as in KL-penalised RLHF. That is what
:func:`sequence_reinforce_loss_from_stats` implements. With every response of one length
``T`` its expected gradient is exactly ``grad J / T``.

Eq. 43 keeps its per-position KL analytic and pathwise (the term AlignDistil distils). Its
expected gradient is ``grad E[sum_t r_t] - beta E[sum_t grad KL_t]`` with the states held
fixed: NOT the full gradient of ``E[sum_t r_t - beta sum_t KL_t]``, which also has the
state-distribution term ``-beta E[sum_t (sum_{j>t} KL_j) grad log pi_theta(y_t|s_t)]``. It
follows the objective "token reward to go, plus a per-state distillation toward pi_dpo
on the states the policy visits"; we implement Eq. 43 as printed.
``tests/losses/test_reinforce.py`` checks both statements exactly by enumerating every
sequence of a tabular policy, and measures the dropped term.

Baselines (off by default, so that Eq. 42/43 are what runs): a scalar per sequence
subtracted from the sentence weight (Eq. 42) or from every ``G_t`` (Eq. 43, computed from
the sequence returns ``G_1``): ``"mean"``, the mean over the group (including the row
itself; slightly biased), or ``"loo"``, the mean over the OTHER rows of the group
(unbiased; RLOO, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", Kool et al. 2019, as
in Ahmadian et al. 2024). A group is the rows that share a prompt (``groups``); without
``groups`` the whole batch is one group.

Normalisation: every ``(B,)`` loss is already divided by its own ``|y|`` (the paper's
``1/|y|``); the caller averages sequences with the global sequence count
(:func:`aligndistil.losses.reductions.sequence_mean`), as for AlignDistil.
"""

from __future__ import annotations

import torch

from aligndistil.losses import ops
from aligndistil.losses.checks import check_finite, check_labels, check_logits, check_positive
from aligndistil.losses.online import check_response_mask, check_token_stats, zero_off

BASELINES = (None, "mean", "loo")


def sequence_baseline(values: torch.Tensor, kind: str | None, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row baseline from per-row values ``(B,) -> (B,)``, detached: zeros, group mean, or leave-one-out mean.

    Args:
        values: ``(B,)`` the quantity to baseline (Eq. 42's weight, Eq. 43's ``G_1``).
        kind: None (zeros), ``"mean"`` or ``"loo"``.
        groups: ``(B,)`` integer prompt ids (rows with one id share a baseline), or None
            (one group).

    Raises:
        ValueError: unknown kind, or ``"loo"`` with a group of one row (no other sample).
    """
    if kind not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
    v = values.detach()
    if kind is None:
        return torch.zeros_like(v)
    if groups is None:
        groups = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
    if groups.shape != v.shape or groups.is_floating_point():
        raise ValueError(f"groups must be ({v.shape[0]},) integer ids, got {tuple(groups.shape)} {groups.dtype}")
    _, idx = torch.unique(groups, return_inverse=True)
    n_groups = int(idx.max()) + 1
    total = v.new_zeros(n_groups).index_add(0, idx, v)[idx]
    count = v.new_zeros(n_groups).index_add(0, idx, torch.ones_like(v))[idx]
    if kind == "mean":
        return total / count
    if bool((count < 2).any()):
        raise ValueError("baseline='loo' needs at least two rows per group (leave-one-out has no other sample)")
    return (total - v) / (count - 1)


def sequence_reinforce_loss_from_stats(
    policy_logps: torch.Tensor,
    dpo_logps: torch.Tensor,
    rev_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta0: float = 0.1,
    beta: float = 0.08,
    baseline: str | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sentence-level REINFORCE (AlignDistil App. E, Eq. 42) in the detached-weight form the equation stands for.

    ``w = r_ctr(x, y) - beta log pi_theta(y|x)/pi_dpo(y|x)`` (detached; minus the baseline)
    and ``L(y) = -(w / |y|) sum_t log pi_theta(y_t|s_t)``, so that
    ``E[-grad L] = E[(w/|y|) grad log pi_theta(y|x)]``: for responses of one length ``T``,
    ``grad J / T`` with ``J = E[r_ctr - beta log pi_theta/pi_dpo]`` (module docstring: why
    the log-ratio is a weight, not a pathwise term).

    Args:
        policy_logps: ``(B, T)`` ``log pi_theta(y_t|s_t)``, differentiable (plain or fused path).
        dpo_logps, rev_logps: ``(B, T)`` label log-probs of ``pi_dpo`` and ``pi_rev``.
        mask: ``(B, T)`` response mask.
        beta0: the DPO models' coefficient in ``r_ctr`` (paper: 0.1), > 0.
        beta: the KL weight toward ``pi_dpo`` (paper's study: 0.08), > 0.
        baseline, groups: see :func:`sequence_baseline` (default: none).

    Returns:
        ``losses (B,)`` and detached per-sequence metrics: ``reward/contrastive`` (``r_ctr``),
        ``reward/contrastive_per_token`` (``r_ctr / |y|``, Fig. 2's y-axis),
        ``kl/dpo_logratio`` (``log pi_theta(y|x)/pi_dpo(y|x)``; its mean estimates
        ``KL(pi_theta || pi_dpo)``), ``reinforce/weight`` (``w`` minus the baseline) and
        ``response_length``.
    """
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    check_token_stats(mask, policy_logps=policy_logps, dpo_logps=dpo_logps, rev_logps=rev_logps)
    lengths = mask.sum(-1)
    seq_logp = zero_off(policy_logps, mask).sum(-1)
    with torch.no_grad():
        r_ctr = beta0 * (zero_off(dpo_logps, mask) - zero_off(rev_logps, mask)).sum(-1)
        log_ratio = seq_logp.detach() - zero_off(dpo_logps, mask).sum(-1)
        w = r_ctr - beta * log_ratio
        weight = w - sequence_baseline(w, baseline, groups)
    losses = -weight * seq_logp / lengths
    metrics = {
        "reward/contrastive": r_ctr,
        "reward/contrastive_per_token": r_ctr / lengths,
        "kl/dpo_logratio": log_ratio,
        "reinforce/weight": weight,
        "response_length": lengths.detach(),
    }
    return losses, metrics


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_t = sum_{i>=t} r_i`` over each row's response tokens: ``(B, T) -> (B, T)``, 0 off the mask."""
    r = zero_off(rewards, mask)
    return zero_off(r.flip(-1).cumsum(-1).flip(-1), mask)


def token_reinforce_loss_from_stats(
    policy_logps: torch.Tensor,
    dpo_logps: torch.Tensor,
    rev_logps: torch.Tensor,
    dpo_kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta0: float = 0.1,
    beta: float = 0.08,
    baseline: str | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level REINFORCE (AlignDistil App. E, Eq. 43), as printed.

    ``r_t = beta0 (log pi_dpo(y_t|s_t) - log pi_rev(y_t|s_t))``, ``G_t = sum_{i>=t} r_i``
    (detached; minus the baseline) and
    ``L(y) = (1/|y|) sum_t [ -G_t log pi_theta(y_t|s_t) + beta KL(pi_theta(.|s_t) || pi_dpo(.|s_t)) ]``.
    ``E[-grad L]`` is ``(1/T) (grad E[sum_t r_t] - beta E[sum_t grad KL_t])`` with the
    state distribution held fixed (module docstring: which objective this is, and the
    term it leaves out).

    Args:
        policy_logps: ``(B, T)`` ``log pi_theta(y_t|s_t)``, differentiable.
        dpo_logps, rev_logps: ``(B, T)`` label log-probs of ``pi_dpo`` and ``pi_rev``.
        dpo_kl: ``(B, T)`` the exact per-position ``KL(pi_theta(.|s_t) || pi_dpo(.|s_t))``,
            differentiable in the policy (:func:`aligndistil.losses.online.kl_full`, or the
            fused producer's KL toward the teacher ``z_dpo``).
        mask: ``(B, T)`` response mask.
        beta0, beta: as :func:`sequence_reinforce_loss_from_stats`.
        baseline, groups: see :func:`sequence_baseline`; the baseline of the sequence
            returns ``G_1`` is subtracted from every ``G_t``.

    Returns:
        ``losses (B,)`` and detached per-sequence metrics: ``reward/contrastive``
        (``sum_t r_t``), ``reward/contrastive_per_token``, ``kl/dpo`` (``sum_t KL_t``) and
        ``response_length``.
    """
    check_positive("beta0", beta0)
    check_positive("beta", beta)
    check_token_stats(mask, policy_logps=policy_logps, dpo_logps=dpo_logps, rev_logps=rev_logps, dpo_kl=dpo_kl)
    lengths = mask.sum(-1)
    with torch.no_grad():
        r = beta0 * (zero_off(dpo_logps, mask) - zero_off(rev_logps, mask))
        returns = reward_to_go(r, mask)
        b = sequence_baseline(returns[:, 0], baseline, groups)
        advantage = zero_off(returns - b.unsqueeze(-1), mask)
    per_token = -advantage * zero_off(policy_logps, mask) + beta * zero_off(dpo_kl, mask)
    losses = per_token.sum(-1) / lengths
    r_sum = r.sum(-1)
    metrics = {
        "reward/contrastive": r_sum,
        "reward/contrastive_per_token": r_sum / lengths,
        "kl/dpo": zero_off(dpo_kl.detach(), mask).sum(-1),
        "response_length": lengths.detach(),
    }
    return losses, metrics


# ----------------------------------------------------------------------------- plain producers
def _plain_stats(policy_logits, dpo_logits, rev_logits, labels, mask):
    check_response_mask("mask", mask)
    check_logits("policy_logits", policy_logits, "mask", mask)
    for name, t in (("dpo_logits", dpo_logits), ("rev_logits", rev_logits)):
        if t.shape != policy_logits.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match policy_logits {tuple(policy_logits.shape)}")
        check_finite(name, t)
    check_labels("labels", labels, "mask", mask, policy_logits.shape[-1])
    dpo, rev = dpo_logits.detach(), rev_logits.detach()
    return (ops.label_logps(policy_logits, labels), ops.label_logps(dpo, labels),
            ops.label_logps(rev, labels), dpo)


def sequence_reinforce_loss(policy_logits, dpo_logits, rev_logits, labels, mask, **kwargs):
    """Eq. 42 on full aligned logits ``(B, T, V)`` with labels and mask ``(B, T)``.

    Label log-probs (:func:`aligndistil.losses.ops.label_logps`), then
    :func:`sequence_reinforce_loss_from_stats` with the same keyword arguments.
    """
    logp, dpo_lp, rev_lp, _ = _plain_stats(policy_logits, dpo_logits, rev_logits, labels, mask)
    return sequence_reinforce_loss_from_stats(logp, dpo_lp, rev_lp, mask, **kwargs)


def token_reinforce_loss(policy_logits, dpo_logits, rev_logits, labels, mask, **kwargs):
    """Eq. 43 on full aligned logits ``(B, T, V)`` with labels and mask ``(B, T)``.

    Label log-probs and the exact ``KL(pi_theta || pi_dpo)`` per position
    (:func:`aligndistil.losses.ops.token_kl`, policy first), then
    :func:`token_reinforce_loss_from_stats` with the same keyword arguments.
    """
    logp, dpo_lp, rev_lp, dpo = _plain_stats(policy_logits, dpo_logits, rev_logits, labels, mask)
    kl = ops.token_kl(policy_logits, dpo)
    return token_reinforce_loss_from_stats(logp, dpo_lp, rev_lp, kl, mask, **kwargs)
