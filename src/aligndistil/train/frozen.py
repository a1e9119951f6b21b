"""The models of a run: the policy as it is loaded (full, or LoRA), the frozen models
(reference, DPO and reverse-DPO teachers) with the check that they share the policy's
vocabulary, and the teacher cache that can stand in for them.

Frozen models load in ``model.dtype`` (bfloat16 halves their memory and nothing about them
trains), in eval mode and without gradients; the trained policy holds float32 master weights
(:mod:`aligndistil.train.accel`). With ``model.lora`` the policy is a peft model, and a frozen
role that is its base or an adapter on that base is served by the policy's own base model
(:mod:`aligndistil.model.lora`): no second copy is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligndistil.config import ConfigError, RunConfig
from aligndistil.model import lora as LR
from aligndistil.train import sharded as SH
from aligndistil.train import teacher_cache as TC
from aligndistil.train.accel import on_main

# The LoRA policy as the checkpoint writers and a method's make_modules see it (model/lora.py).
saveable = LR.saveable
modules_source = LR.modules_source


def check_setup(cfg: RunConfig, method, accelerator=None) -> None:
    """What LoRA and the on-policy sampler need, checked before anything loads: peft installed,
    every adapter folder among the frozen roles trained on the policy's base (both bases named
    otherwise), ``model.lora.target_modules`` names the policy's linear layers, no sharded
    training (the shared base would need its shards gathered per role); vLLM installed, a GPU,
    an on-policy method (:func:`aligndistil.model.vllm_sampler.check_backend`)."""
    from aligndistil.model import vllm_sampler as VS

    m = cfg.model
    paths = [m.policy] + [getattr(m, r) for r in method.frozen]
    if m.lora is not None or any(LR.is_adapter_folder(p) for p in paths if p):
        LR.require_peft()
    for role in method.frozen:
        path = getattr(m, role)
        if path:
            LR.check_adapter_base(f"model.{role}", path, m.policy, policy_lora=m.lora is not None)
    if m.lora is not None:
        if SH.is_sharded(accelerator):
            raise ConfigError("model.lora is not supported under FSDP or DeepSpeed by this trainer (frozen roles run on "
                              "the policy's base between its forward and backward); use DDP or one process")
        LR.check_target_modules_early(m.policy, list(m.lora.target_modules), m.trust_remote_code)
    VS.check_backend(cfg.method, uses_sampling=method.batch == "prompt")


def load_policy(cfg: RunConfig, path, *, gradient_checkpointing: bool = False, log=print):
    """The policy to train from ``path`` (a model folder, or the run's checkpoint): float32 full
    weights, or with ``model.lora`` the float32 base plus a float32 adapter. (The base could be
    held in ``model.dtype``: nothing updates it. It is not yet, because the policy's outputs
    under autocast come back in float32 and meet the head in places that do not cast.)"""
    from aligndistil.model.loading import load_causal_lm

    if cfg.model.lora is None:
        policy = load_causal_lm(path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
    else:
        policy = LR.load_policy(path, cfg.model.lora, dtype=torch.float32,
                                trust_remote_code=cfg.model.trust_remote_code, log=log)
    if gradient_checkpointing:
        LR.enable_gradient_checkpointing(policy)
    policy.config.use_cache = False
    return policy


def load_frozen(cfg: RunConfig, role: str, dtype, *, policy, tokenizer, device, log=print):
    """Model ``role`` (its ``model.<role>`` path, else the policy's), checked against the
    policy's vocabulary, frozen and on ``device``. With a LoRA policy a role on the policy's
    base is served by that base (:func:`aligndistil.model.lora.shared_role`)."""
    from aligndistil.model.loading import load_causal_lm

    path = getattr(cfg.model, role) or cfg.model.policy
    m = LR.shared_role(role, path, policy, cfg.model.policy, log=log)
    if m is None:
        LR.check_adapter_base(f"model.{role}", path, cfg.model.policy, policy_lora=cfg.model.lora is not None)
        m = load_causal_lm(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    check_vocab(cfg, role, path, m, policy=policy, tokenizer=tokenizer, log=log)
    m.eval().requires_grad_(False)
    return m.to(device)


def _rows(weight) -> int:
    """A head's vocabulary size; under ZeRO-3 its weight is partitioned (0 elements here) and
    DeepSpeed keeps the full shape in ``ds_shape``."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def check_vocab(cfg: RunConfig, role: str, path: str, model, *, policy, tokenizer, log=print) -> None:
    """Refuse a frozen model whose vocabulary is not the policy's: token-level losses compare
    distributions id by id. The head sizes must match; when the model's folder has a
    tokenizer, its token-to-id map must equal the policy tokenizer's too (a head of the
    right size over another tokenizer would otherwise train silently on nonsense)."""
    from aligndistil.model.loading import ModelLoadError, check_same_vocab, load_tokenizer

    pv, mv = (_rows(m.get_output_embeddings().weight) for m in (policy, model))
    if pv != mv:
        raise ValueError(
            f"model.{role} ({path}) has a vocabulary of {mv} but the policy ({cfg.model.policy}) has {pv}: "
            "teachers and reference must share the policy's tokenizer and vocabulary"
        )
    if str(path) == str(cfg.model.policy):
        return
    try:
        tok = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    except (ModelLoadError, OSError, ValueError):
        log(f"[vocab] model.{role} ({path}) has no tokenizer; checked the head size only")
        return
    check_same_vocab(tokenizer, tok, name_a="policy", name_b=f"model.{role}")


def open_teacher_cache(cfg: RunConfig, method, acc, *, features, collator, policy, chunk_size, load, log=print):
    """Open (building it on first use, every process over its share of the data) the teacher cache of ``cfg``;
    refuse a stale one. ``load(role)`` loads a frozen model for the build."""
    TC.check_supported(method)
    roles = {r: getattr(cfg.model, r) or cfg.model.policy for r in method.frozen}
    fp = TC.fingerprint(cfg, roles, features, method.batch)
    for role, path in roles.items():  # an adapter's outputs depend on its base's weights too
        if LR.is_adapter_folder(path):
            fp["weights"][role] = {"adapter": fp["weights"][role], "base": TC.hash_model_files(LR.adapter_base(path))}
    folder = Path(cfg.train.teacher_cache)
    # The main process decides for all (they must all build, or none: the build is collective).
    if on_main(acc, lambda: not (folder / TC.MANIFEST).is_file()):
        log(f"[teacher cache] building {folder} (the frozen models run once over the data, "
            f"split over {acc.num_processes} process(es))")
        models = {r: load(r) for r in roles}
        TC.build(folder, models=models, features=features, collator=collator,
                 kind=method.batch, fp=fp, tvd_roles=method.tvd_roles,
                 batch_size=cfg.train.per_device_batch_size, chunk_size=chunk_size, device=acc.device, log=log,
                 ranks=TC.Ranks(acc.process_index, acc.num_processes, agree=_agree(acc)))
        del models
    cache = TC.TeacherCache(folder, fp, device=acc.device)
    pv = _rows(policy.get_output_embeddings().weight)
    if cache.vocab_size != pv:
        raise ValueError(f"teacher cache {folder} has a vocabulary of {cache.vocab_size} but the policy has {pv}")
    log(f"[teacher cache] using {folder} for {', '.join(cache.roles)}")
    return cache


def _agree(acc):
    """:attr:`aligndistil.train.teacher_cache.Ranks.agree` over accelerate's processes."""
    if acc.num_processes == 1:
        return lambda err: [err]
    from accelerate.utils import gather_object

    return lambda err: gather_object([err])


def make_sampler(cfg: RunConfig, method, log=print):
    """The on-policy sampler for ``method.generation_backend=vllm`` (a
    :class:`aligndistil.model.vllm_sampler.VLLMSampler`), or None for our HF sampling loop."""
    if cfg.method.generation_backend != "vllm" or method.batch != "prompt":
        return None
    from aligndistil.model import vllm_sampler as VS
    from aligndistil.model.loading import resolve_model_path

    path = LR.adapter_base(cfg.model.policy) if LR.is_adapter_folder(cfg.model.policy) else cfg.model.policy
    return VS.VLLMSampler(cfg.method, resolve_model_path(path), dtype=cfg.model.dtype, seed=cfg.train.seed, log=log)
