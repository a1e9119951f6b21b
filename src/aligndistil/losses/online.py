"""What the online methods share: per-token KL estimators, token-level rewards, GAE, whitening.

The online methods (PPO, "Proximal Policy Optimization Algorithms", Schulman et al. 2017;
RTO, "DPO Meets PPO: Reinforced Token Optimization for RLHF", Zhong et al. 2024; and the
REINFORCE baselines of "AlignDistil" (Zhang et al. 2025), App. E) sample a response
``y ~ pi_theta(.|x)`` and then need, per response token ``t = 1..T``:

- a KL estimate to a fixed model (:func:`kl_k1`, :func:`kl_k3` from the sampled token's
  log-probs; :func:`kl_full`, the exact KL over the vocabulary, from logits);
- a token-level reward (:func:`log_ratio_token_reward`: RTO's
  ``clip(beta1 log pi_dpo/pi_ref, -c, c)`` and AlignDistil Eq. 43's
  ``beta0 log pi_dpo/pi_rev``), assembled with a sequence score and the KL penalty by
  :func:`token_rewards`;
- PPO's advantages (:func:`gae_advantages`, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", Schulman et al. 2016) and :func:`masked_whiten`.

Everything here is computed on detached inputs and returns detached tensors: rewards,
advantages and returns are constants of the policy update. Shapes: ``(B, T)`` per token,
aligned so that column ``t`` is response token ``t`` (:mod:`aligndistil.model.outputs`),
with a ``(B, T)`` mask of 1 on response tokens. Rows have different lengths; each row's
response tokens must be one contiguous run (left-justified and right-padded is what the
package produces).
"""

from __future__ import annotations

import torch

from aligndistil.losses import ops
from aligndistil.losses.checks import check_finite, check_logits, check_mask, check_nonnegative, check_positive

KL_ESTIMATORS = ("k1", "k3")


def check_response_mask(name: str, mask: torch.Tensor) -> None:
    """A ``(B, T)`` 0/1 mask, at least one token per row, the tokens of each row contiguous.

    GAE's recursion and "the last response token" are only defined for one run of tokens.
    """
    check_mask(name, mask, mask.shape)
    m = mask.detach()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    starts = (m[:, 1:] - m[:, :-1] == 1).sum(-1) + m[:, 0]
    broken = (starts != 1).nonzero().flatten().tolist()
    if broken:
        raise ValueError(f"{name} rows {broken} are not one contiguous run of response tokens")


def _check_per_token(name: str, t: torch.Tensor, mask: torch.Tensor) -> None:
    if t.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} like the mask")
    # Padding may hold anything (a gathered prompt position, -inf from a masked fill); only
    # the response tokens must be finite.
    check_finite(name, t.detach()[mask.detach() > 0])


def check_token_stats(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """A valid response mask (:func:`check_response_mask`) and ``(B, T)`` statistics finite on it."""
    check_response_mask("mask", mask)
    for name, t in tensors.items():
        _check_per_token(name, t, mask)


def zero_off(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` on response tokens, 0 on padding: ``(B, T)``.

    ``torch.where``, not a product: whatever padding holds (inf, NaN) then sends neither a
    NaN value nor a NaN gradient.
    """
    return torch.where(mask > 0, t, torch.zeros_like(t))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last response token: ``(B, T) -> (B,)`` long."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return ((mask > 0) * cols).amax(dim=-1)


# ----------------------------------------------------------------------------- KL estimators
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1: ``log pi(y_t|s_t) - log pi_ref(y_t|s_t)``, elementwise ``(B, T) -> (B, T)``.

    Unbiased for ``KL(pi || pi_ref)`` at ``s_t`` when ``y_t ~ pi``, but negative on some
    samples. The naming (k1, k3) follows J. Schulman, "Approximating KL Divergence" (2020),
    as TRL's and OpenRLHF's ``kl_estimator`` options do.
    """
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3: ``exp(-d) + d - 1`` with ``d = k1``, elementwise ``(B, T) -> (B, T)``.

    With ``r = pi_ref/pi = exp(-d)`` this is ``(r - 1) - log r >= 0``: unbiased for the same
    KL, never negative, and ``d^2/2 + O(d^3)`` near 0. ``expm1`` keeps the rounding error
    near ``eps |d|`` (``exp(-d) - 1`` would lose small ``d`` to cancellation).
    """
    d = logps - ref_logps
    return torch.expm1(-d) + d


def kl_estimate(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token KL estimate from sampled-token log-probs, zero off the mask: ``(B, T)``.

    Args:
        logps: ``(B, T)`` ``log pi(y_t|s_t)`` of the sampling policy.
        ref_logps: ``(B, T)`` ``log pi_ref(y_t|s_t)``.
        mask: ``(B, T)`` response mask.
        estimator: ``"k1"`` (default, as TRL and OpenRLHF) or ``"k3"``. For the exact KL over
            the vocabulary use :func:`kl_full`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS} (or use kl_full), got {estimator!r}")
    check_response_mask("mask", mask)
    _check_per_token("logps", logps, mask)
    _check_per_token("ref_logps", ref_logps, mask)
    fn = kl_k1 if estimator == "k1" else kl_k3
    return zero_off(fn(logps, ref_logps), mask)


def kl_full(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(pi(.|s_t) || pi_ref(.|s_t))`` over the vocabulary, zero off the mask: ``(B, T, V) -> (B, T)``.

    The reverse KL (policy first) of :func:`aligndistil.losses.ops.token_kl`; differentiable
    in ``policy_logits`` (the gradient is Eq. 43's pathwise term when ``ref_logits`` are
    ``pi_dpo``'s), no gradient reaches ``ref_logits``. The fused path produces the same
    statistic chunk by chunk (:mod:`aligndistil.losses.fused`).
    """
    check_response_mask("mask", mask)
    check_logits("policy_logits", policy_logits, "mask", mask)
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must match policy_logits {tuple(policy_logits.shape)}")
    check_finite("ref_logits", ref_logits)
    return ops.token_kl(policy_logits, ref_logits.detach()) * mask


# ----------------------------------------------------------------------------- token rewards
def log_ratio_token_reward(
    numerator_logps: torch.Tensor,
    denominator_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    clip: float | None = None,
) -> torch.Tensor:
    """Dense token reward ``clip(coef * (log p(y_t|s_t) - log q(y_t|s_t)), -clip, clip)``: ``(B, T)``, detached.

    - RTO ("DPO Meets PPO", Zhong et al. 2024): ``p = pi_dpo``, ``q = pi_ref``,
      ``coef = beta1`` (their recipe: 0.05, clipped at ``c = 0.05``).
    - AlignDistil Eq. 43's token contrastive reward: ``p = pi_dpo``, ``q = pi_rev``,
      ``coef = beta0``, no clip; summed over tokens it is the sentence-level ``r_ctr``
      of Eq. 42.

    Args:
        numerator_logps, denominator_logps: ``(B, T)`` label log-probs of the two models.
        mask: ``(B, T)`` response mask; the reward is 0 off it.
        coef: > 0.
        clip: ``c > 0`` or None (no clipping).
    """
    check_positive("coef", coef)
    if clip is not None:
        check_positive("clip", clip)
    check_response_mask("mask", mask)
    _check_per_token("numerator_logps", numerator_logps, mask)
    _check_per_token("denominator_logps", denominator_logps, mask)
    with torch.no_grad():
        r = coef * (numerator_logps - denominator_logps)
        if clip is not None:
            r = r.clamp(-clip, clip)
        return zero_off(r, mask)


def token_rewards(
    mask: torch.Tensor,
    *,
    score: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's per-token reward ``rew_t = dense_t - kl_coef * kl_t + [t = T] * score``: ``(B, T)``, detached.

    The sequence score ``R(x, y)`` sits on the LAST response token of each row (its column
    from :func:`last_token_index`), as in TRL and OpenRLHF. PPO uses ``score`` and ``kl``;
    RTO adds ``dense`` (:func:`log_ratio_token_reward`), with ``score`` in the RTO authors'
    recipe and without it in AlignDistil's.

    Args:
        mask: ``(B, T)`` response mask (contiguous rows).
        score: ``(B,)`` finite sequence rewards, or None.
        kl: ``(B, T)`` per-token KL to the reference (:func:`kl_estimate` or :func:`kl_full`),
            or None; detached here, so the penalty is part of the reward, not a loss term.
        kl_coef: the penalty coefficient (TRL/OpenRLHF ``kl_coef`` / ``init_kl_coef``), >= 0.
        dense: ``(B, T)`` a dense token reward, or None.

    Returns:
        ``rewards (B, T)`` (0 off the mask) and detached per-sequence metrics:
        ``reward/score``, ``reward/dense`` (sum over tokens), ``reward/kl_penalty``
        (``kl_coef * sum_t kl_t``), ``reward/total`` (sum of ``rewards``) and ``kl/ref``
        (``sum_t kl_t``, the sequence KL estimate), each ``(B,)``; the entries of absent
        parts are zeros.
    """
    check_nonnegative("kl_coef", kl_coef)
    check_response_mask("mask", mask)
    B = mask.shape[0]
    m = mask.detach()
    dtype = torch.float32
    for t in (m, score, kl, dense):
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    rewards = torch.zeros(m.shape, dtype=dtype, device=m.device)
    zeros = rewards.new_zeros(B)
    score_b = dense_b = kl_b = zeros
    if dense is not None:
        _check_per_token("dense", dense, mask)
        dense_t = zero_off(dense.detach().to(rewards.dtype), m)
        rewards = rewards + dense_t
        dense_b = dense_t.sum(-1)
    if kl is not None:
        _check_per_token("kl", kl, mask)
        kl_t = zero_off(kl.detach().to(rewards.dtype), m)
        rewards = rewards - kl_coef * kl_t
        kl_b = kl_t.sum(-1)
    if score is not None:
        if score.shape != (B,):
            raise ValueError(f"score has shape {tuple(score.shape)}, expected ({B},): one reward per response")
        check_finite("score", score)
        score_b = score.detach().to(rewards.dtype)
        rewards = rewards.scatter_add(1, last_token_index(m).unsqueeze(-1), score_b.unsqueeze(-1))
    metrics = {
        "reward/score": score_b,
        "reward/dense": dense_b,
        "reward/kl_penalty": kl_coef * kl_b,
        "reward/total": rewards.sum(-1),
        "kl/ref": kl_b,
    }
    return rewards, metrics


# ----------------------------------------------------------------------------- GAE and whitening
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16) and the value targets.

    Per row, over its response tokens ``t = 1..T``::

        delta_t = rew_t + gamma * V_{t+1} - V_t          (V_{T+1} = 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}        (A_{T+1} = 0)
        G_t     = A_t + V_t                              (the critic's regression target)

    ``gamma = lam = 1`` gives ``A_t = (sum_{i>=t} rew_i) - V_t``. Defaults are TRL's and
    OpenRLHF's (``gamma = 1``, ``lam``/``lambd = 0.95``).

    Args:
        rewards: ``(B, T)`` per-token rewards (:func:`token_rewards`).
        values: ``(B, T)`` the critic's ``V(s_t)`` at rollout time; padding may hold anything.
        mask: ``(B, T)`` response mask, one contiguous run per row.
        gamma, lam: in ``[0, 1]``.

    Returns:
        ``advantages (B, T)`` and ``returns (B, T)``, detached, 0 off the mask.
    """
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
    check_response_mask("mask", mask)
    _check_per_token("rewards", rewards, mask)
    _check_per_token("values", values, mask)
    with torch.no_grad():
        m = (mask > 0).to(rewards.dtype)
        r = zero_off(rewards, m)
        v = zero_off(values.to(rewards.dtype), m)
        T = r.shape[1]
        running = r.new_zeros(r.shape[0])
        columns = [None] * T
        for t in reversed(range(T)):
            # v is 0 past the row's last token, so V_{T+1} = 0; the mask resets the
            # recursion on padding, so A_{T+1} = 0 and nothing leaks across rows' ends.
            next_v = v[:, t + 1] if t + 1 < T else running.new_zeros(r.shape[0])
            delta = r[:, t] + gamma * next_v - v[:, t]
            running = (delta + gamma * lam * running) * m[:, t]
            columns[t] = running
        advantages = torch.stack(columns, dim=1)
        return advantages, (advantages + v) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries of the whole tensor: ``(B, T)``, detached.

    As TRL's ``masked_whiten``: the mean and the Bessel-corrected variance are taken over
    every response token of the batch given (the caller chooses which batch: the rollout
    batch on one process here), and ``shift_mean=False`` adds the mean back (scales only).
    Zero off the mask.

    Raises:
        ValueError: fewer than two response tokens (the variance is undefined).
    """
    check_positive("eps", eps)
    check_response_mask("mask", mask)
    _check_per_token("x", x, mask)
    with torch.no_grad():
        m = (mask > 0).to(x.dtype)
        n = m.sum()
        if n < 2:
            raise ValueError("masked_whiten needs at least two response tokens in the batch")
        xm = zero_off(x, m)
        mean = xm.sum() / n
        var = (((xm - mean) * m) ** 2).sum() / (n - 1)
        out = (xm - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return out * m
