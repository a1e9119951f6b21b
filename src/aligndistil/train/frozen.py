"""The frozen models of a run (reference, DPO and reverse-DPO teachers): loading, the check
that they share the policy's vocabulary, and the teacher cache that can stand in for them.

They load in ``model.dtype`` (bfloat16 halves their memory and nothing about them trains),
in eval mode and without gradients; the trained policy is the loop's
(:mod:`aligndistil.train.loop`), in float32 master weights (:mod:`aligndistil.train.accel`).
"""

from __future__ import annotations

from pathlib import Path

from aligndistil.config import RunConfig
from aligndistil.train import teacher_cache as TC


def load_frozen(cfg: RunConfig, role: str, dtype, *, policy, tokenizer, device, log=print):
    """Model ``role`` (its ``model.<role>`` path, else the policy's), checked against the
    policy's vocabulary, frozen and on ``device``."""
    from aligndistil.model.loading import load_causal_lm

    path = getattr(cfg.model, role) or cfg.model.policy
    m = load_causal_lm(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    check_vocab(cfg, role, path, m, policy=policy, tokenizer=tokenizer, log=log)
    m.eval().requires_grad_(False)
    return m.to(device)


def check_vocab(cfg: RunConfig, role: str, path: str, model, *, policy, tokenizer, log=print) -> None:
    """Refuse a frozen model whose vocabulary is not the policy's: token-level losses compare
    distributions id by id. The head sizes must match; when the model's folder has a
    tokenizer, its token-to-id map must equal the policy tokenizer's too (a head of the
    right size over another tokenizer would otherwise train silently on nonsense)."""
    from aligndistil.model.loading import ModelLoadError, check_same_vocab, load_tokenizer

    pv = policy.get_output_embeddings().weight.shape[0]
    mv = model.get_output_embeddings().weight.shape[0]
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
    """Open (building it on first use, on the main process) the teacher cache of ``cfg``;
    refuse a stale one. ``load(role)`` loads a frozen model for the build."""
    TC.check_supported(method)
    roles = {r: getattr(cfg.model, r) or cfg.model.policy for r in method.frozen}
    fp = TC.fingerprint(cfg, roles, features, method.batch)
    folder = Path(cfg.train.teacher_cache)
    with acc.main_process_first():
        if not (folder / TC.MANIFEST).is_file() and acc.is_main_process:
            log(f"[teacher cache] building {folder} (the frozen models run once over the data)")
            models = {r: load(r) for r in roles}
            TC.build(folder, models=models, features=features, collator=collator,
                     kind=method.batch, fp=fp, tvd_roles=method.tvd_roles,
                     batch_size=cfg.train.per_device_batch_size,
                     chunk_size=chunk_size, device=acc.device, log=log)
            del models
        cache = TC.TeacherCache(folder, fp, device=acc.device)
    pv = policy.get_output_embeddings().weight.shape[0]
    if cache.vocab_size != pv:
        raise ValueError(f"teacher cache {folder} has a vocabulary of {cache.vocab_size} but the policy has {pv}")
    log(f"[teacher cache] using {folder} for {', '.join(cache.roles)}")
    return cache
