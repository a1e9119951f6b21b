"""Each training method as a small declaration: models, batch, loss.

A :class:`Method` says which frozen models it needs (by role: ``reference``, ``dpo_model``,
``reverse_dpo_model``), which batch it takes (``pairs``, ``sft`` = prompt + response,
``unpaired``, ``prompt``), how its loss is normalised (per sequence or per token), and a
``loss`` function that turns model outputs into per-sequence losses and metrics by calling
the pure functions of :mod:`aligndistil.losses`. The one training loop in
:mod:`aligndistil.train.loop` runs every method; methods never touch optimisers, data order
or devices, so adding a method means adding a declaration here, not a trainer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from aligndistil import losses as L
from aligndistil.config import MethodConfig
from aligndistil.model.sampling import sample_responses
from aligndistil.losses.ops import label_logps
from aligndistil.losses import fused as FL
from aligndistil.data.collate import pad_right
from aligndistil.model.outputs import ResponseOutputs, pair_outputs, response_outputs, unwrap

ROLES = ("reference", "dpo_model", "reverse_dpo_model")


@dataclass
class StepContext:
    """What a method's loss may use in one micro-batch.

    Attributes:
        policy: the trained model (possibly wrapped for distributed training).
        frozen: role -> frozen model (eval mode, no gradients).
        cfg: the method's hyper-parameters.
        modules: extra trainable modules (SparsePO mask) by name.
        pad_token_id, eos_token_id: for on-policy sampling.
        all_mean: averages a scalar tensor over data-parallel ranks (identity on one process).
        loss_path: ``"fused"`` (chunked losses from hidden states, never ``B x T x V``) or
            ``"plain"`` (full logits; the reference implementation).
        chunk_size: rows per chunk on the fused path.
        compile_loss: run the fused path's element-wise chunk body under ``torch.compile``.
        cache: a :class:`aligndistil.train.teacher_cache.TeacherCache` serving frozen models'
            outputs from disk (those roles are then absent from ``frozen``), or None.
        tokenizer: the policy's tokenizer (online methods decode samples for their reward).
        sampler: the on-policy sampler when it is not our HF sampling loop (a vLLM engine,
            :mod:`aligndistil.model.vllm_sampler`), else None.
        all_done: when every forward of the policy is a collective (FSDP, ZeRO-3), whether
            every process's samples have ended (:func:`~aligndistil.model.sampling.sample_with_logprobs`);
            None otherwise.
    """

    policy: nn.Module
    frozen: dict
    cfg: MethodConfig
    modules: dict = field(default_factory=dict)
    pad_token_id: int = 0
    eos_token_id: object = None
    all_mean: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    loss_path: str = "fused"
    chunk_size: int = FL.DEFAULT_CHUNK_SIZE
    compile_loss: bool = False
    cache: object = None
    tokenizer: object = None
    sampler: object = None
    all_done: Callable[[bool], bool] | None = None

    @property
    def fused(self) -> bool:
        return self.loss_path == "fused"


#: ``Method.uncacheable`` of a declaration that does not say whether the teacher cache can
#: serve it. The safe default: a cached role is not loaded, so a method that reads more of a
#: frozen model than its final hidden state must never be served by accident.
UNDECLARED = "it does not declare that the teacher cache can serve its frozen models"


@dataclass(frozen=True)
class Method:
    """A training method: everything the trainer and the teacher cache need to know about it.

    Attributes:
        name: the ``method.name`` it is registered under.
        batch: the batch kind it trains on (:data:`aligndistil.data.KINDS`).
        frozen: roles (:data:`ROLES`) of the frozen models it reads; the trainer loads
            exactly these (``reference`` defaults to the policy's weights).
        normaliser: ``"sequences"`` or ``"tokens"``: what the optimizer step averages over.
        loss: ``(ctx, batch) -> (losses (B,), metrics)``.
        prepare: ``(ctx, batch) -> batch`` run before counting (on-policy sampling).
        make_modules: ``(policy, cfg) -> {name: nn.Module}`` extra trainable modules.
        negative_role: the frozen role the teacher extrapolates away from (AlignDistil's
            ``pi_ref`` or ``pi_rev``, Eq. 11/15), None for methods without a teacher.
        uncacheable: None when :mod:`aligndistil.train.teacher_cache` can serve every frozen
            role (the loss reads only final hidden states of fixed responses), else why not;
            the cache's refusal quotes it.
        tvd_roles: ``(base, negative)`` roles whose per-token ``TVD`` the cache stores
            next to their hidden states (the adaptive teacher's ``alpha_t``, Eq. 17), or None.
        updates: ``(ctx, micro_batches) -> [micro_batches, ...]``: the optimizer updates of one
            step, each a list of micro-batches normalised on its own (PPO: epochs x
            mini-batches over one rollout batch); None: one update of the step's batch.
        params: the ``method.*`` keys (besides ``name``) its loss, rollout or extra modules
            read, or None (undeclared: every key counts). A pipeline does not apply a global
            override of any other ``method`` key to this method's stages, so such an override
            cannot change their fingerprints (:meth:`uses`). Declare a key when in doubt: one
            missing here that does matter would be dropped.
    """

    name: str
    batch: str
    frozen: tuple = ()
    normaliser: str = "sequences"
    loss: Callable = None
    prepare: Callable | None = None
    make_modules: Callable | None = None
    negative_role: str | None = None
    uncacheable: str | None = UNDECLARED
    tvd_roles: tuple[str, str] | None = None
    updates: Callable | None = None
    params: tuple | None = None

    def uses(self, key: str) -> bool:
        """Whether a ``section.key`` setting can change this method's run: every ``data`` and
        ``train`` key; of ``model``, the frozen roles it loads (:data:`ROLES`) and the rest; of
        ``method``, ``name`` and its declared :attr:`params`."""
        section, _, name = key.partition(".")
        if section == "method":
            return self.params is None or name == "name" or name in self.params
        if section == "model" and name in ROLES:
            return name in self.frozen
        return True

    def count(self, batch: dict) -> int:
        """This batch's share of the optimizer step's normaliser (sequences or tokens)."""
        return int(self.row_counts(batch).sum())

    def row_counts(self, batch: dict) -> torch.Tensor:
        """``(B,)`` each row's share of the normaliser: 1 per sequence, or its response tokens."""
        if self.normaliser == "tokens":
            key = "response_mask" if "response_mask" in batch else "chosen_response_mask"
            # response_mask marks response tokens; all of them are predicted (position 0 never is one).
            return batch[key].sum(-1)
        key = "input_ids" if "input_ids" in batch else "chosen_input_ids"
        return torch.ones(batch[key].shape[0], dtype=torch.long, device=batch[key].device)


# --------------------------------------------------------------------------- outputs and paths
# Every loss below is written once: it asks for model outputs, turns them into loss inputs
# with `_inputs` (full logits on the plain path, `FL.HeadRows` on the fused path), calls the
# STATISTICS PRODUCER that `_pick` chose for that path (per-token log-probs, KL, alpha) and
# hands the statistics to the loss's one `*_from_stats` composition. The fused producers
# mirror the plain ones' arguments, so a method never branches on the path itself.


def _frozen_outputs(ctx: StepContext, role: str, batch_or_pair, pair: bool, **kw):
    """A frozen model's outputs: from the teacher cache when it holds ``role``, else a forward."""
    if ctx.cache is not None and ctx.cache.has(role) and not kw:
        return ctx.cache.outputs(role, batch_or_pair, pair)
    model = ctx.frozen[role]
    with torch.no_grad():
        if pair:
            return pair_outputs(model, batch_or_pair, compute_logits=not ctx.fused, **kw)
        return response_outputs(model, batch_or_pair["input_ids"], batch_or_pair["attention_mask"],
                                batch_or_pair["response_mask"], compute_logits=not ctx.fused, **kw)


def _single(ctx: StepContext, batch: dict, **kw) -> ResponseOutputs:
    return response_outputs(ctx.policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                            compute_logits=not ctx.fused, **kw)


def _policy_pair(ctx: StepContext, batch: dict, **kw):
    return pair_outputs(ctx.policy, batch, compute_logits=not ctx.fused, **kw)


def _inputs(*outs: ResponseOutputs) -> tuple[list, bool]:
    """Loss inputs for ``outs`` and whether they are fused: ``HeadRows`` when every output
    has a linear head and no logits, else full logits for all (the plain path)."""
    if all(o.logits is None and o.head is not None for o in outs):
        return [FL.HeadRows(o.hidden, *o.head) for o in outs], True
    return [o.head_logits() for o in outs], False


def _pick(ctx: StepContext, fused: bool, plain_fn: Callable, fused_fn: Callable, **fused_only) -> Callable:
    """The plain producer, or its fused counterpart with this run's chunk size, compile switch
    and ``fused_only`` keywords (hints the plain path has no use for)."""
    if fused:
        return functools.partial(fused_fn, chunk_size=ctx.chunk_size, compile=ctx.compile_loss, **fused_only)
    return plain_fn


def _plain_logps(zs, labels, masks):
    return [label_logps(z, y) for z, y in zip(zs, labels)]


def _logps(ctx: StepContext, *outs: ResponseOutputs) -> list[torch.Tensor]:
    """``(B, T)`` label log-probs of the response tokens of each of ``outs`` (outputs of one
    model; fused: in one pass)."""
    zs, fused = _inputs(*outs)
    fn = _pick(ctx, fused, _plain_logps, FL.label_logps_group)
    return fn(zs, [o.labels for o in outs], [o.mask for o in outs])


# --------------------------------------------------------------------------- SFT
def sft_loss(ctx: StepContext, batch: dict):
    """NLL of the response tokens; normalised per token over the optimizer step."""
    out = _single(ctx, batch)
    nll = -(_logps(ctx, out)[0] * out.mask).sum(-1)
    return nll, {"nll/sequence": nll.detach(), "response_length": out.mask.sum(-1)}


# --------------------------------------------------------------------------- DPO family
def _pair_logps(ctx: StepContext, batch: dict, with_reference: bool = True):
    pc, pr = _policy_pair(ctx, batch)
    lp = tuple(_logps(ctx, pc, pr))
    if not with_reference:
        return lp, (None, None), (pc.mask, pr.mask)
    rc, rr = _frozen_outputs(ctx, "reference", batch, pair=True)
    with torch.no_grad():
        ref = tuple(_logps(ctx, rc, rr))
    return lp, ref, (pc.mask, pr.mask)


def dpo_family_loss(fn, **extra):
    def loss(ctx: StepContext, batch: dict):
        (pc, pr), (rc, rr), (mc, mr) = _pair_logps(ctx, batch)
        kw = {k: getattr(ctx.cfg, v) for k, v in extra.items()}
        return fn(pc, pr, rc, rr, mc, mr, beta=ctx.cfg.beta, **kw)
    return loss


def simpo_step(ctx: StepContext, batch: dict):
    (pc, pr), _, (mc, mr) = _pair_logps(ctx, batch, with_reference=False)
    return L.simpo_loss(pc, pr, mc, mr, beta=ctx.cfg.beta, gamma=ctx.cfg.gamma)


def _mismatched(batch: dict, pad_token_id: int) -> dict:
    """Prompt ``i`` with the completion of example ``i+1``: KTO's KL reference-point sample."""
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    B = ids.shape[0]
    prompts = [ids[i][att[i].bool() & ~resp[i].bool()] for i in range(B)]
    completions = [ids[i][resp[i].bool()] for i in range(B)]
    seqs, rmasks = [], []
    for i in range(B):
        c = completions[(i + 1) % B]
        seqs.append(torch.cat([prompts[i], c]))
        rmasks.append(torch.cat([torch.zeros_like(prompts[i]), torch.ones_like(c)]))
    new_ids = pad_right(seqs, pad_token_id)
    return {
        "input_ids": new_ids,
        "attention_mask": pad_right([torch.ones_like(s) for s in seqs], 0, new_ids.shape[1]),
        "response_mask": pad_right(rmasks, 0, new_ids.shape[1]),
    }


def kto_step(ctx: StepContext, batch: dict):
    out = _single(ctx, batch)
    ref = _frozen_outputs(ctx, "reference", batch, pair=False)
    mism = _mismatched(batch, ctx.pad_token_id)
    with torch.no_grad():
        # z0 estimates KL(pi_theta || pi_ref) from mismatched pairs, averaged over ranks;
        # KTO detaches it (no gradient through the reference point).
        pm = _single(ctx, mism)
        rm = _frozen_outputs(ctx, "reference", mism, pair=False)
        kl = ((_logps(ctx, pm)[0] - _logps(ctx, rm)[0]) * pm.mask).sum(-1).mean()
        z0 = ctx.all_mean(kl)
        ref_logps = _logps(ctx, ref)[0]
    return L.kto_loss(
        _logps(ctx, out)[0], ref_logps, out.mask,
        batch["label"], z0, beta=ctx.cfg.beta,
        desirable_weight=ctx.cfg.desirable_weight, undesirable_weight=ctx.cfg.undesirable_weight,
    )


# --------------------------------------------------------------------------- TDPO / SparsePO / MaPO
def _token_level_outputs(ctx: StepContext, batch: dict, **ref_kw):
    pc, pr = _policy_pair(ctx, batch)
    rc, rr = _frozen_outputs(ctx, "reference", batch, pair=True, **ref_kw)
    return pc, pr, rc, rr


def _pair_token_stats(ctx: StepContext, pc, pr, rc, rr) -> tuple:
    """Label log-probs and ``KL(pi_ref || pi_theta)`` per token of both responses, in the
    order :func:`aligndistil.losses.token_level_dpo_from_stats` takes them."""
    zs, fused = _inputs(pc, pr, rc, rr)
    produce = _pick(ctx, fused, L.pair_token_stats, FL.token_level_stats)
    return produce(*zs, pc.labels, pr.labels, pc.mask, pr.mask)


def tdpo_step(variant: int):
    def loss(ctx: StepContext, batch: dict):
        pc, pr, rc, rr = _token_level_outputs(ctx, batch)
        stats = _pair_token_stats(ctx, pc, pr, rc, rr)
        return L.tdpo_loss_from_stats(*stats, pc.mask, pr.mask, variant=variant, beta=ctx.cfg.beta,
                                      alpha=ctx.cfg.alpha)
    return loss


def sparsepo_step(ctx: StepContext, batch: dict):
    pc, pr, rc, rr = _token_level_outputs(ctx, batch, all_hidden=True)
    mask_net = ctx.modules["mask"]
    mu_c, md_c = mask_net(rc.all_hidden)
    mu_r, md_r = mask_net(rr.all_hidden)
    stats = _pair_token_stats(ctx, pc, pr, rc, rr)
    return L.sparsepo_loss_from_stats(*stats, pc.mask, pr.mask,
                                      mu_c * pc.mask, mu_r * pr.mask, md_c * pc.mask, md_r * pr.mask,
                                      beta=ctx.cfg.beta, lambda_u=ctx.cfg.lambda_u, lambda_d=ctx.cfg.lambda_d)


def make_sparsepo_mask(policy: nn.Module, cfg: MethodConfig) -> dict:
    conf = unwrap(policy).config
    return {"mask": L.SparsePOMask(conf.num_hidden_layers + 1, conf.hidden_size, shared=cfg.mask_shared)}


def mapo_step(ctx: StepContext, batch: dict):
    pc, pr, rc, rr = _token_level_outputs(ctx, batch, activations=True)
    m_c = L.mapo_mask(rc.activations, pc.mask)
    m_r = L.mapo_mask(rr.activations, pr.mask)
    stats = _pair_token_stats(ctx, pc, pr, rc, rr)
    return L.sparsepo_loss_from_stats(*stats, pc.mask, pr.mask, m_c, m_r, m_c, m_r,
                                      beta=ctx.cfg.beta, lambda_u=0.0, lambda_d=0.0)


# --------------------------------------------------------------------------- AlignDistil
TEACHERS = ("vanilla", "contrastive", "adaptive", "constant")
#: The ``method.*`` constants each teacher reads (see :func:`teacher_alpha`, :func:`aligndistil_step`).
TEACHER_PARAMS = {"vanilla": ("beta",), "contrastive": ("beta",), "adaptive": ("r", "eps"), "constant": ("alpha",)}
MODES = ("off_policy", "on_policy")


def teacher_alpha(cfg: MethodConfig) -> tuple[float | None, float | None]:
    """``(alpha, beta)`` of the configured teacher: ``alpha`` None means adaptive (per token);
    ``beta`` is the vanilla teacher's constant token weight (Eq. 11), else None."""
    if cfg.teacher == "vanilla":
        return L.vanilla_alpha(cfg.beta0, cfg.beta), cfg.beta
    if cfg.teacher == "contrastive":
        return L.contrastive_alpha(cfg.beta0, cfg.beta), None
    if cfg.teacher == "constant":
        return cfg.alpha, None
    return None, None


def negative_role(cfg: MethodConfig) -> str:
    """The teacher's negative model: the reference (vanilla) or the reverse-DPO model."""
    return "reference" if cfg.teacher == "vanilla" else "reverse_dpo_model"


def aligndistil_step(ctx: StepContext, batch: dict):
    """Eq. 18/19: reverse KL to the composite teacher at every response token."""
    cfg = ctx.cfg
    pol = _single(ctx, batch)
    dpo = _frozen_outputs(ctx, "dpo_model", batch, pair=False)
    neg = _frozen_outputs(ctx, negative_role(cfg), batch, pair=False)
    alpha, beta = teacher_alpha(cfg)
    tvd = ctx.cache.tvd(batch, pol.mask) if alpha is None and ctx.cache is not None and ctx.cache.has_tvd else None
    weighting = {"beta0": cfg.beta0, "weighting": cfg.weighting, "beta": beta}
    zs, fused = _inputs(pol, dpo, neg)
    # The fused producer precomputes the gradients when it knows what each token's KL will
    # receive from the composition (the row weight): a measured speed-up of the backward.
    hint = L.kl_row_weight(pol.mask, alpha=alpha, **weighting) if fused else {}
    produce = _pick(ctx, fused, L.aligndistil_token_stats, FL.aligndistil_token_stats, **hint)
    kl, alpha, tvd = produce(*zs, pol.mask, alpha=alpha, r=cfg.r, eps=cfg.eps, tvd=tvd)
    losses, metrics = L.aligndistil_loss_from_stats(kl, pol.mask, alpha=alpha, tvd=tvd, **weighting)
    if cfg.mode == "on_policy" and negative_role(cfg) == "reverse_dpo_model":
        # The contrastive reward of the samples (the convergence study's metric) from the two
        # teachers' outputs just computed: their heads' label log-probs, no further forward.
        metrics.update(ON.contrastive_metrics(ctx, dpo, neg))
    return losses, metrics


def on_policy_prepare(ctx: StepContext, batch: dict) -> dict:
    """Replace a prompt batch by responses sampled from the current policy (no gradient)."""
    cfg = ctx.cfg
    sync = {} if ctx.sampler is not None else {"all_done": ctx.all_done}  # vLLM samples apart from the policy
    return (ctx.sampler.sample_responses if ctx.sampler is not None else sample_responses)(
        ctx.policy, batch["prompt_input_ids"], batch["prompt_attention_mask"],
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        num_samples=cfg.num_samples, eos_token_id=ctx.eos_token_id, pad_token_id=ctx.pad_token_id, **sync,
    )


# --------------------------------------------------------------------------- registry
# Why the teacher cache cannot serve a method: it stores final hidden states of fixed responses.
_NO_FROZEN = "it has no frozen model"
_ON_POLICY = ("method.mode=on_policy samples new responses every step, so the teachers' outputs on them "
              "cannot be computed in advance (use method.mode=off_policy)")

# The online methods (PPO, RTO, REINFORCE) build on the helpers above; their steps live in
# aligndistil.train.online, which reads this module's helpers only when a step runs.
from aligndistil.train import online as ON  # noqa: E402

_SAMPLES = ("it samples new responses from the policy every step (online RL), so the frozen models' outputs "
            "on them cannot be computed in advance")
# The method.* keys each method reads (Method.params): sampling responses, then PPO's rollout and updates.
_SAMPLING = ("temperature", "top_p", "max_new_tokens", "num_samples", "log_reward", "generation_backend", "vllm_mode",
             "vllm_server_url", "vllm_gpu_memory_utilization", "vllm_importance_sampling_correction",
             "vllm_importance_sampling_cap")
_PPO = _SAMPLING + ("reward", "missing_eos_penalty", "kl_coef", "kl_estimator", "discount", "lam", "cliprange",
                    "cliprange_value", "vf_coef", "ppo_epochs", "num_mini_batches", "whiten_advantages",
                    "critic_init", "critic_learning_rate")
_ONLINE = dict(batch="prompt", prepare=ON.ppo_rollout, make_modules=ON.make_ppo_modules, updates=ON.ppo_updates,
               uncacheable=_SAMPLES)

_STATIC = {
    "sft": Method("sft", "sft", (), "tokens", sft_loss, uncacheable=_NO_FROZEN, params=()),
    "dpo": Method("dpo", "pairs", ("reference",), "sequences", dpo_family_loss(L.dpo_loss, reverse="reverse"),
                  uncacheable=None, params=("beta", "reverse")),
    "ipo": Method("ipo", "pairs", ("reference",), "sequences", dpo_family_loss(L.ipo_loss, logps="ipo_logps"),
                  uncacheable=None, params=("beta", "ipo_logps")),
    "dpop": Method("dpop", "pairs", ("reference",), "sequences", dpo_family_loss(L.dpop_loss, lambda_="lambda_"),
                   uncacheable=None, params=("beta", "lambda_")),
    "simpo": Method("simpo", "pairs", (), "sequences", simpo_step, uncacheable=_NO_FROZEN, params=("beta", "gamma")),
    "kto": Method("kto", "unpaired", ("reference",), "sequences", kto_step,
                  uncacheable="its KL reference point is computed on mismatched prompt/completion pairs "
                              "that change every step",
                  params=("beta", "desirable_weight", "undesirable_weight")),
    # TDPO1 is TDPO2's formula with alpha fixed at 1 (tdpo_loss_from_stats): method.alpha is TDPO2's only.
    "tdpo1": Method("tdpo1", "pairs", ("reference",), "sequences", tdpo_step(1), uncacheable=None, params=("beta",)),
    "tdpo2": Method("tdpo2", "pairs", ("reference",), "sequences", tdpo_step(2), uncacheable=None,
                    params=("beta", "alpha")),
    "sparsepo": Method("sparsepo", "pairs", ("reference",), "sequences", sparsepo_step, make_modules=make_sparsepo_mask,
                       uncacheable="its mask network reads every layer's hidden states of the reference, "
                                   "not only the last",
                       params=("beta", "lambda_u", "lambda_d", "mask_shared", "mask_learning_rate",
                               "mask_weight_decay")),
    "mapo": Method("mapo", "pairs", ("reference",), "sequences", mapo_step,
                   uncacheable="its mask reads the reference's attention and MLP activations, "
                               "not only the last hidden state",
                   params=("beta",)),
    # PPO / RTO: one step = one rollout batch, then ppo_epochs x num_mini_batches updates (docs/online-rl.md).
    "ppo": Method("ppo", frozen=("reference",), normaliser="tokens", loss=ON.ppo_loss, params=_PPO, **_ONLINE),
    "rto": Method("rto", frozen=("reference", "dpo_model"), normaliser="tokens", loss=ON.ppo_loss,
                  params=_PPO + ("beta1", "rto_clip", "rto_recipe"), **_ONLINE),
}
METHOD_NAMES = tuple(_STATIC) + ("aligndistil", "reinforce")


def _aligndistil(cfg: MethodConfig) -> Method:
    """AlignDistil for one teacher and mode: the teacher picks the frozen models
    (:func:`negative_role` is the one home of that rule), the mode the batch."""
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"method.teacher must be one of {TEACHERS}, got {cfg.teacher!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"method.mode must be one of {MODES}, got {cfg.mode!r}")
    negative = negative_role(cfg)
    on = cfg.mode == "on_policy"
    return Method(
        "aligndistil", "prompt" if on else "sft", ("dpo_model", negative), "sequences",
        # On-policy, the step also reports its rollout's metrics (rollout/ended, log_reward's).
        ON.with_rollout_metrics(aligndistil_step) if on else aligndistil_step,
        prepare=ON.sample if on else None, negative_role=negative,
        uncacheable=_ON_POLICY if on else None,
        # With the reverse-DPO model as negative an (off-policy) cache also stores
        # TVD(pi_dpo, pi_rev): the adaptive teacher's alpha_t needs it, and one cache serves runs
        # that differ only in method.teacher, r or eps (none of them is in its fingerprint).
        tvd_roles=None if on or negative == "reference" else ("dpo_model", negative),
        # The teacher's own constants (teacher_alpha: beta for vanilla / contrastive, alpha for
        # constant; r, eps for adaptive), and the sampling keys when on-policy.
        params=("mode", "teacher", "beta0", "weighting") + TEACHER_PARAMS[cfg.teacher] + (_SAMPLING if on else ()),
    )


def _reinforce(cfg: MethodConfig) -> Method:
    """REINFORCE with the contrastive reward (AlignDistil App. E): Eq. 42 or Eq. 43 by ``method.level``."""
    if cfg.level not in ON.LEVELS:
        raise ValueError(f"method.level must be one of {ON.LEVELS}, got {cfg.level!r}")
    return Method("reinforce", "prompt", ("dpo_model", "reverse_dpo_model"), "sequences", ON.reinforce_loss,
                  prepare=ON.sample, uncacheable=_SAMPLES, params=("beta0", "beta", "baseline", "level") + _SAMPLING)


def get_method(cfg: MethodConfig) -> Method:
    """The :class:`Method` for a config, validating method-specific options."""
    if cfg.name not in METHOD_NAMES:
        raise ValueError(f"method.name must be one of {METHOD_NAMES}, got {cfg.name!r}")
    ON.check_config(cfg)
    if cfg.name == "aligndistil":
        return _aligndistil(cfg)
    if cfg.name == "reinforce":
        return _reinforce(cfg)
    return _STATIC[cfg.name]
