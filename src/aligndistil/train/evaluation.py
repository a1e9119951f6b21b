"""Evaluation during training: the method's own loss and metrics on held-out examples.

The eval set is ``data.eval_file`` (read like ``train_file``: same formats, batch kind,
lengths and chat-template rule; its split is ``data.eval_split``) or a fraction
``data.eval_split_ratio`` of the usable training examples held out by ``train.seed``
(:func:`aligndistil.data.splits.holdout_split`). It is scored every ``train.eval_steps``
optimizer steps and after the last step, and the results join that step's record in
``metrics.jsonl`` (and the loggers) under ``eval/``: ``eval/loss`` and ``eval/<metric>``
for every metric the method's loss returns (DPO family: ``eval/rewards/chosen``,
``eval/rewards/rejected``, ``eval/rewards/accuracies``, ``eval/rewards/margins`` ...;
token-level methods: their KL, alpha and mask metrics).

What the numbers are. ``eval/loss`` is the method's loss over the whole eval set, normalised
as a training step is (:attr:`Method.normaliser`): ``sum_i loss_i / sum_i n_i`` with
``n_i`` 1 per sequence, or the response tokens of row ``i`` for token-normalised methods
(SFT). A metric is averaged over all its values on the eval set, as the training loop
averages it over a step. Scoring runs under ``torch.no_grad`` with the policy (and extra
modules) in eval mode, which draws no random numbers: a run with an eval set trains exactly
the weights of the same run without one (the config fingerprint leaves ``eval_file`` out).

Processes. Each eval batch of ``per_device_batch_size`` rows per process is a slice of the
eval set in file order; every process runs the same number of batches (a loss may average
over processes, as KTO's reference point does), the last one filled by repeating examples
from the start, which are left out of the sums. The sums are added over processes.

Methods that sample their responses from the policy every step (on-policy AlignDistil, PPO,
RTO, REINFORCE: a declaration with ``prepare``) have no fixed responses to score; an eval
set with one of them is refused before anything loads. Their held-out measure is
``aligndistil eval`` on held-out prompts after training (rewards, KL to the reference).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aligndistil.config import ConfigError, RunConfig

PREFIX = "eval/"


def wanted(cfg: RunConfig) -> bool:
    """Whether the run has an eval set."""
    return bool(cfg.data.eval_file or cfg.data.eval_split_ratio)


def check_config(cfg: RunConfig, method) -> None:
    """Refuse, before anything loads, an eval set this run cannot score or find, or eval
    settings that do not fit together."""
    d = cfg.data
    if d.eval_file and d.eval_split_ratio:
        raise ConfigError("data.eval_file and data.eval_split_ratio each make an eval set: set one of them")
    if cfg.train.eval_steps and not wanted(cfg):
        raise ConfigError(f"train.eval_steps={cfg.train.eval_steps} needs an eval set: data.eval_file or "
                          "data.eval_split_ratio")
    if not wanted(cfg):
        return
    from aligndistil.data import HUB_PREFIX

    which = "data.eval_file" if d.eval_file else "data.eval_split_ratio"
    if method.prepare is not None:
        raise ConfigError(f"{which}: method {method.name} samples its responses from the policy every step, so there "
                          "are no fixed held-out responses to score during training; leave the eval set out and "
                          "evaluate the trained model with `aligndistil eval` on held-out prompts")
    if cfg.train.teacher_cache:
        raise ConfigError(f"{which} with train.teacher_cache: the cache serves the training examples only and the "
                          "frozen models it replaces are not loaded, so held-out examples cannot be scored; "
                          "drop one of the two")
    if d.eval_file and not d.eval_file.startswith(HUB_PREFIX) and not Path(d.eval_file).expanduser().exists():
        raise ConfigError(f"data.eval_file: {d.eval_file} does not exist")


def split_features(cfg: RunConfig, tokenizer, kind: str, features: list, log=print) -> tuple[list, list | None]:
    """``(training features, eval features or None)`` from the training features and the config.

    ``data.eval_file`` is read and tokenised as the training data is; ``data.eval_split_ratio``
    holds out part of ``features`` (before ``data.max_examples`` cuts the rest).

    Raises:
        DataError: the eval file is malformed or has no usable example (:func:`aligndistil.data.build_dataset`),
            or the split leaves none to train on.
    """
    from aligndistil import data as D
    from aligndistil.data.splits import holdout_split

    d = cfg.data
    if d.eval_file:
        held, report = D.build_dataset(d.eval_file, tokenizer, kind, max_length=d.max_length,
                                       max_prompt_length=d.max_prompt_length, use_chat_template=d.use_chat_template,
                                       split=d.eval_split, config=d.dataset_config)
        log(f"[eval] {d.eval_file}: {report.summary()}")
        return features, held
    if d.eval_split_ratio:
        train_idx, eval_idx = holdout_split(len(features), d.eval_split_ratio, cfg.train.seed, where=d.train_file)
        log(f"[eval] holding out {len(eval_idx)} of the {len(features)} usable examples of {d.train_file} "
            f"(data.eval_split_ratio={d.eval_split_ratio}, seed {cfg.train.seed})")
        return [features[i] for i in train_idx], [features[i] for i in eval_idx]
    return features, None


def due(step: int, eval_steps: int, total_steps: int) -> bool:
    """Whether optimizer step ``step`` (1-based) is evaluated: every ``eval_steps``, and the last."""
    return step == total_steps or bool(eval_steps) and step % eval_steps == 0


def _batches(n: int, batch_size: int, rank: int, world_size: int):
    """This process's ``(indices, real)`` eval batches: the same number on every process;
    ``real`` marks the rows that are not repeats filling the last batch."""
    per_round = batch_size * world_size
    for start in range(0, n, per_round):
        idx = [start + rank * batch_size + j for j in range(batch_size)]
        if world_size == 1:
            idx = [i for i in idx if i < n]
        yield [i % n for i in idx], [i < n for i in idx]


def evaluate(method, ctx, features: list, collator, accelerator, batch_size: int,
             modules: dict | None = None) -> dict[str, float]:
    """Score ``features`` with ``method``'s loss; returns ``{"eval/loss": ..., "eval/<metric>": ...}``.

    Args:
        method: the run's :class:`~aligndistil.train.methods.Method` (no ``prepare``).
        ctx: the training :class:`~aligndistil.train.methods.StepContext` (policy, frozen models).
        features: the eval features; collator: the run's collator.
        accelerator: the run's ``accelerate.Accelerator`` (device, processes).
        batch_size: rows per process per batch.
        modules: extra trainable modules, switched to eval mode with the policy.
    """
    acc = accelerator
    trained = [ctx.policy, *(modules or {}).values()]
    for m in trained:
        m.eval()  # no dropout: scoring draws no random numbers
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    norm = torch.zeros((), dtype=torch.float64, device=acc.device)
    sums: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for idx, real in _batches(len(features), batch_size, acc.process_index, acc.num_processes):
                batch = {k: v.to(acc.device) for k, v in collator([features[i] for i in idx]).items()}
                w = torch.tensor(real, dtype=torch.float64, device=acc.device)
                losses, metrics = method.loss(ctx, batch)
                loss_sum += (losses.detach().double() * w).sum()
                norm += (method.row_counts(batch).double() * w).sum()
                for k, v in metrics.items():
                    v = v.detach().double()
                    s = sums.setdefault(k, [torch.zeros_like(loss_sum), torch.zeros_like(loss_sum)])
                    if v.dim() >= 1 and v.shape[0] == len(idx):  # one value (or row of values) per example
                        rows = v.reshape(len(idx), -1)
                        s[0] += (rows * w[:, None]).sum()
                        s[1] += w.sum() * rows.shape[1]
                    else:  # a batch-level value (KTO's reference point): one per batch
                        s[0] += v.sum() if any(real) else 0.0
                        s[1] += v.numel() if any(real) else 0
    finally:
        for m in trained:
            m.train()
    keys = sorted(sums)
    flat = torch.stack([loss_sum, norm, *[x for k in keys for x in sums[k]]])
    if acc.num_processes > 1:
        flat = acc.reduce(flat, reduction="sum")
    out = {PREFIX + "loss": float(flat[0] / flat[1]) if flat[1] > 0 else math.nan}
    for j, k in enumerate(keys):
        total, count = flat[2 + 2 * j], flat[3 + 2 * j]
        if count > 0:
            out[PREFIX + k] = float(total / count)
    return out
