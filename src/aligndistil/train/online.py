"""The online methods' steps: rollouts, rewards, PPO / RTO and REINFORCE in the one loop.

Each online method is a :class:`~aligndistil.train.methods.Method` on ``prompt`` batches
whose ``prepare`` is a ROLLOUT (no gradient): sample responses from the current policy
(:func:`aligndistil.model.sampling.sample_responses`: our temperature and top-p only), then
compute what the loss treats as constants. The formulas are
:mod:`aligndistil.losses.online`, :mod:`aligndistil.losses.ppo` and
:mod:`aligndistil.losses.reinforce`; docs/online-rl.md says which paper equation each is.

- PPO ("Proximal Policy Optimization Algorithms", Schulman et al. 2017) and RTO ("DPO Meets
  PPO: Reinforced Token Optimization for RLHF", Zhong et al. 2024): the rollout computes the
  sampling policy's log-probs, the per-token reward (:func:`aligndistil.losses.token_rewards`:
  sequence score on the last token, KL penalty to the reference, RTO's DPO token reward),
  the critic's values (:mod:`aligndistil.train.critic`) and GAE; :func:`ppo_updates` turns
  the step's rollout batch into ``ppo_epochs x num_mini_batches`` optimizer updates (the
  loop's ``Method.updates`` hook) and :func:`ppo_loss` is the clipped policy loss plus
  ``vf_coef`` times the clipped value loss, per token (normaliser ``tokens``).
- REINFORCE with the contrastive reward (AlignDistil App. E, Eq. 42 sentence level, Eq. 43
  token level): the rollout only samples; the loss reads ``pi_dpo`` and ``pi_rev`` on the
  samples (one update per step, normaliser ``sequences``).

Per-row rollout metrics travel in the batch under ``metric:<name>`` keys (``(B,)``
tensors) and are reported by the loss, so they are logged once per step like any other.

Rewards are given TEXT: the prompt as the policy saw it (its tokens decoded, special tokens
dropped, so a chat template's role words remain) and the response up to its EOS (the EOS
itself dropped). A response cut by ``max_new_tokens`` is scored as it is, unless
``method.missing_eos_penalty`` is set (then that is subtracted from its score). A reward
that raises, returns a non-number, NaN/inf or the wrong count stops the run with
:class:`~aligndistil.rewards.RewardError` (exit code 2) naming the reward; nothing of that
step is saved.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from aligndistil import losses as L
from aligndistil.config import ConfigError
from aligndistil.losses import fused as FL
from aligndistil.losses.online import zero_off
from aligndistil.rewards.specs import BT_PREFIX, BUILTIN_REWARDS, RewardError, get_reward, resolve_callable
from aligndistil.train.critic import CRITIC, make_critic

if TYPE_CHECKING:
    from aligndistil.train.methods import StepContext

METRIC = "metric:"
LEVELS = ("sequence", "token")


def _m():
    # aligndistil.train.methods imports this module for its registry, so its helpers are
    # looked up when a step runs, not when this module is imported.
    from aligndistil.train import methods

    return methods


# ----------------------------------------------------------------------------- configuration
def check_reward_spec(key: str, spec) -> None:
    """Refuse a reward spec that cannot work, before any model is loaded: an unknown name, an
    empty ``bt:``, or a ``module:function`` that does not import. A ``bt:`` folder is read
    when the reward is first used (PPO/RTO: while the run is set up)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key} must be a reward spec (vader, bt:DIR or module:function), got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return
    if spec.startswith(BT_PREFIX):
        if not spec[len(BT_PREFIX):]:
            raise ConfigError(f"{key}: give the reward model folder, e.g. bt:outputs/reward_model")
        return
    if ":" not in spec:
        raise ConfigError(f"{key}: unknown reward {spec!r}; use one of {sorted(BUILTIN_REWARDS)}, bt:DIR or "
                          "module:function")
    try:
        resolve_callable(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_config(cfg) -> None:
    """What an online method needs of ``method.*`` beyond each key's own range."""
    if cfg.name in ("ppo", "rto"):
        if cfg.name == "ppo" or cfg.rto_recipe == "rto":
            check_reward_spec("method.reward", cfg.reward)
        if cfg.critic_init != "policy" and not (cfg.critic_init.startswith(BT_PREFIX) and cfg.critic_init[3:]):
            raise ConfigError(f"method.critic_init must be policy or bt:<reward model folder>, got {cfg.critic_init!r}")
    if cfg.name == "reinforce" and cfg.baseline == "loo" and cfg.num_samples < 2:
        raise ConfigError("method.baseline=loo needs method.num_samples >= 2 (leave-one-out needs another sample "
                          "of the same prompt)")
    if cfg.log_reward is not None:
        check_reward_spec("method.log_reward", cfg.log_reward)


@functools.lru_cache(maxsize=8)
def reward_fn(spec: str):
    """The checked reward of ``spec``, built once per process (a ``bt:`` model is loaded once)."""
    return get_reward(spec)


# ----------------------------------------------------------------------------- rollouts
def rollout_texts(tokenizer, batch: dict) -> tuple[list[str], list[str]]:
    """``(prompts, responses)`` of a sampled batch as text (module docstring: what a reward sees)."""
    ids, att, resp = batch["input_ids"], batch["attention_mask"].bool(), batch["response_mask"].bool()
    ended = batch["ended"]
    prompts, responses = [], []
    for b in range(ids.shape[0]):
        r = ids[b][resp[b]]
        if bool(ended[b]):
            r = r[:-1]  # the EOS is not text
        prompts.append(tokenizer.decode(ids[b][att[b] & ~resp[b]].tolist(), skip_special_tokens=True).strip())
        responses.append(tokenizer.decode(r.tolist(), skip_special_tokens=True).strip())
    return prompts, responses


def score(ctx: StepContext, spec: str, batch: dict) -> torch.Tensor:
    """``(B,)`` float32 scores of ``spec`` on the sampled batch; a bad reward raises RewardError."""
    fn = reward_fn(spec)
    prompts, responses = rollout_texts(ctx.tokenizer, batch)
    try:
        values = fn(prompts, responses)
    except ValueError as e:  # CheckedReward: NaN, a non-number, the wrong count
        raise RewardError(f"{e} (scoring {len(responses)} sampled responses)") from e
    return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)


def sample(ctx: StepContext, batch: dict) -> dict:
    """Responses sampled from the current policy for a ``prompt`` batch, with their prompt group
    (rows that share a prompt), whether each ended with EOS, and the ``log_reward`` metric."""
    b = _m().on_policy_prepare(ctx, batch)
    n = batch["prompt_input_ids"].shape[0]
    b["prompt_group"] = torch.arange(n, device=b["input_ids"].device).repeat_interleave(ctx.cfg.num_samples)
    b[METRIC + "rollout/ended"] = b["ended"].float()
    if ctx.cfg.log_reward is not None:
        b[METRIC + "rollout/reward"] = score(ctx, ctx.cfg.log_reward, b)
    return b


def rollout_metrics(batch: dict) -> dict:
    return {k[len(METRIC):]: v for k, v in batch.items() if k.startswith(METRIC)}


def _label_logps(ctx: StepContext, role: str | None, batch: dict) -> torch.Tensor:
    """``(B, T)`` label log-probs of the policy (``role`` None) or a frozen model, no gradient."""
    M = _m()
    with torch.no_grad():
        out = M._single(ctx, batch) if role is None else M._frozen_outputs(ctx, role, batch, pair=False)
        return zero_off(M._logps(ctx, out)[0].float(), out.mask)


def contrastive_metrics(ctx: StepContext, dpo, rev) -> dict:
    """``reward/contrastive`` ``r_ctr = beta0 log pi_dpo(y|x)/pi_rev(y|x)`` and
    ``reward/contrastive_per_token`` (``r_ctr / |y|``, AlignDistil Fig. 2's y-axis), ``(B,)`` each,
    from the DPO and reverse-DPO models' outputs on the samples (``ResponseOutputs`` a loss
    has already computed: no further forward, only their heads' label log-probs)."""
    with torch.no_grad():
        dpo_lp, rev_lp = _m()._logps(ctx, dpo)[0].float(), _m()._logps(ctx, rev)[0].float()
        r = ctx.cfg.beta0 * zero_off(dpo_lp - rev_lp, dpo.mask).sum(-1)
        return {"reward/contrastive": r, "reward/contrastive_per_token": r / dpo.mask.sum(-1).clamp(min=1)}


def with_rollout_metrics(loss_fn):
    """``loss_fn`` whose metrics also report the batch's rollout metrics."""
    def loss(ctx: StepContext, batch: dict):
        losses, metrics = loss_fn(ctx, batch)
        return losses, {**metrics, **rollout_metrics(batch)}
    loss.__name__ = getattr(loss_fn, "__name__", "loss")
    return loss


# ----------------------------------------------------------------------------- PPO and RTO
def ppo_rollout(ctx: StepContext, batch: dict) -> dict:
    """PPO's and RTO's rollout: samples, ``old_logps``, rewards, ``old_values``, advantages, returns.

    Every added per-token tensor is ``(B, T)`` aligned to response tokens (column ``t`` is
    token ``t``); a mini-batch of fewer rows reads its first ``T'`` columns.
    """
    cfg = ctx.cfg
    b = sample(ctx, batch)
    old = _label_logps(ctx, None, b)
    ref = _label_logps(ctx, "reference", b)
    mask = (b["response_mask"].sum(-1, keepdim=True) > torch.arange(old.shape[1], device=old.device)).float()
    dense = score_b = None
    if cfg.name == "rto":
        dpo = _label_logps(ctx, "dpo_model", b)
        dense = L.log_ratio_token_reward(dpo, ref, mask, coef=cfg.beta1, clip=cfg.rto_clip)
    if cfg.name == "ppo" or cfg.rto_recipe == "rto":
        score_b = score(ctx, cfg.reward, b)
        if cfg.missing_eos_penalty is not None:
            score_b = score_b - cfg.missing_eos_penalty * (~b["ended"]).float()
    kl = L.kl_estimate(old, ref, mask, estimator=cfg.kl_estimator)
    rewards, metrics = L.token_rewards(mask, score=score_b, kl=kl, kl_coef=cfg.kl_coef, dense=dense)
    with torch.no_grad():
        values = zero_off(ctx.modules[CRITIC](b["input_ids"], b["attention_mask"], b["response_mask"]).float(), mask)
    advantages, returns = L.gae_advantages(rewards, values, mask, gamma=cfg.discount, lam=cfg.lam)
    b.update(old_logps=old, old_values=values, advantages=advantages, returns=returns, rollout_mask=mask)
    if cfg.vllm_importance_sampling_correction and "sampler_logps" in b:
        # vLLM sampled from pi_vllm, not pi_old: weight each token's policy loss (model/vllm_sampler.py).
        from aligndistil.model.vllm_sampler import truncated_is_weight

        w = truncated_is_weight(old, b["sampler_logps"][:, :old.shape[1]], mask, cfg.vllm_importance_sampling_cap)
        b["is_weight"] = w
        metrics["rollout/is_weight"] = (w.sum(-1) / mask.sum(-1).clamp_min(1)).detach()
    b.update({METRIC + k: v for k, v in metrics.items()})
    return b


def make_ppo_modules(policy, cfg) -> dict:
    """PPO's and RTO's extra module, the critic (:func:`aligndistil.train.critic.make_critic`).

    The rewards are built here too, while the run is set up: a ``bt:`` folder that is missing
    or incomplete then stops the run before its output folder is touched.
    """
    if cfg.name == "ppo" or cfg.rto_recipe == "rto":
        reward_fn(cfg.reward)
    if cfg.log_reward is not None:
        reward_fn(cfg.log_reward)
    return make_critic(policy, cfg)


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The rows ``rows`` of every per-row tensor of ``batch``."""
    n = batch["input_ids"].shape[0]
    return {k: (v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
            for k, v in batch.items()}


def _whiten(micro: list[dict]) -> None:
    """Whiten ``advantages`` over every response token of this process's rollout batch, in place."""
    T = max(b["advantages"].shape[1] for b in micro)

    def pad(t):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]))

    adv = torch.cat([pad(b["advantages"]) for b in micro])
    mask = torch.cat([pad(b["rollout_mask"]) for b in micro])
    white = L.masked_whiten(adv, mask)
    start = 0
    for b in micro:
        n, t = b["advantages"].shape
        b["advantages"] = white[start:start + n, :t]
        start += n


def ppo_updates(ctx: StepContext, micro: list[dict]) -> list[list[dict]]:
    """One rollout batch -> ``ppo_epochs x num_mini_batches`` optimizer updates.

    Each epoch shuffles the rows of each micro-batch (torch's global generator, saved in
    checkpoints) and cuts them into ``num_mini_batches`` near-equal parts (fewer when a
    micro-batch has fewer rows); update ``j`` of the epoch takes part ``j`` of every
    micro-batch, so gradient accumulation keeps its meaning inside an update.
    """
    cfg = ctx.cfg
    if cfg.whiten_advantages:
        _whiten(micro)
    for b in micro:
        if "is_weight" in b:
            # w_t >= 0 scales the clipped per-token objective: max(-A w r, -A w clip(r)) = w max(-A r, -A clip(r)).
            b["advantages"] = b["advantages"] * b["is_weight"][:, :b["advantages"].shape[1]]
    rows = micro[0]["input_ids"].shape[0]
    k = min(cfg.num_mini_batches, rows)
    updates = []
    for _ in range(cfg.ppo_epochs):
        if k == 1:
            updates.append(micro)
            continue
        parts = [torch.randperm(b["input_ids"].shape[0]).tensor_split(k) for b in micro]
        for j in range(k):
            updates.append([_rows(b, p[j]) for b, p in zip(micro, parts)])
    return updates


def ppo_loss(ctx: StepContext, batch: dict):
    """The clipped policy loss plus ``vf_coef`` times the clipped value loss, per-row token sums."""
    cfg = ctx.cfg
    M = _m()
    out = M._single(ctx, batch)
    mask = out.mask
    T = mask.shape[1]

    def stat(key):
        return batch[key][:, :T]

    logps = M._logps(ctx, out)[0]
    pol, pm = L.ppo_policy_loss(logps, stat("old_logps"), stat("advantages"), mask, cliprange=cfg.cliprange)
    values = ctx.modules[CRITIC](batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    val, vm = L.ppo_value_loss(values, stat("old_values"), stat("returns"), mask, cliprange_value=cfg.cliprange_value)
    return pol + cfg.vf_coef * val, {**pm, **vm, **rollout_metrics(batch)}


# ----------------------------------------------------------------------------- REINFORCE (App. E)
def reinforce_loss(ctx: StepContext, batch: dict):
    """Eq. 42 (``method.level=sequence``) or Eq. 43 (``token``) on the sampled batch, ``(B,)`` losses."""
    cfg = ctx.cfg
    M = _m()
    pol = M._single(ctx, batch)
    dpo = M._frozen_outputs(ctx, "dpo_model", batch, pair=False)
    rev = M._frozen_outputs(ctx, "reverse_dpo_model", batch, pair=False)
    logp = M._logps(ctx, pol)[0]
    with torch.no_grad():
        dpo_lp, rev_lp = M._logps(ctx, dpo)[0], M._logps(ctx, rev)[0]
    kw = dict(beta0=cfg.beta0, beta=cfg.beta, baseline=cfg.baseline, groups=batch["prompt_group"])
    if cfg.level == "sequence":
        losses, metrics = L.sequence_reinforce_loss_from_stats(logp, dpo_lp, rev_lp, pol.mask, **kw)
    else:
        # KL(pi_theta || pi_dpo) per position: AlignDistil's teacher KL with alpha = 0, whose
        # teacher z_dpo + 0 (z_dpo - z_neg) is pi_dpo itself (plain or fused producer).
        zs, fused = M._inputs(pol, dpo)
        produce = M._pick(ctx, fused, L.aligndistil_token_stats, FL.aligndistil_token_stats)
        kl, _, _ = produce(zs[0], zs[1], zs[1], pol.mask, alpha=0.0)
        losses, metrics = L.token_reinforce_loss_from_stats(logp, dpo_lp, rev_lp, kl, pol.mask, **kw)
    return losses, {**metrics, **rollout_metrics(batch)}

