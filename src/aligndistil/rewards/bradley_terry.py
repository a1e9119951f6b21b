"""A Bradley-Terry reward model: a causal LM body with a scalar head, trained on pairs.

``r(x, y) = w . h_last + b``, where ``h_last`` is the body's final hidden state at the last
token of ``[prompt ; response ; EOS]`` (tokenised exactly as training data is, by
:mod:`aligndistil.data`). Training minimises the Bradley-Terry loss
``-log sigma(r(x, y_w) - r(x, y_l))`` over preference pairs (AlignDistil Table 2 compares
the DPO and contrastive implicit rewards against such a model).

A trained model is a folder: the body as an HF model folder (safetensors, with its
tokenizer), ``reward_head.safetensors``, ``metrics.jsonl`` and ``reward_model.json`` (its
settings and final metrics). The folder is written under a temporary name and renamed
into place, ``reward_model.json`` last, so a folder that has it is complete. Use it as a
reward anywhere a reward spec is accepted: ``bt:<folder>``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from aligndistil.data.collate import pad_with_mask
from aligndistil.model.outputs import position_ids_from_mask

__all__ = ["BTRewardModel", "BTReward", "bt_loss", "load_reward_model", "train_reward_model", "MARKER"]

MARKER = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigma(r_w - r_l)``: ``(B,), (B,) -> (B,)``."""
    return -F.logsigmoid(r_chosen - r_rejected)


class BTRewardModel(nn.Module):
    """A transformer body (``AutoModel``) and a linear head on the last attended token."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards ``(B,)`` of RIGHT- or left-padded sequences (pooled at each row's last real token)."""
        pos = position_ids_from_mask(attention_mask)
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state
        L = attention_mask.shape[1]
        last = (attention_mask.long() * torch.arange(L, device=attention_mask.device)[None]).argmax(-1)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return self.head(pooled.float()).squeeze(-1)


def _load_body(path: str):
    from transformers import AutoModel

    from aligndistil.model.loading import ModelLoadError, _dtype_kwargs, resolve_model_path

    resolved = resolve_model_path(path)
    try:
        return AutoModel.from_pretrained(resolved, use_safetensors=True, **_dtype_kwargs(torch.float32))
    except OSError as e:
        raise ModelLoadError(f"Could not load a model body from {resolved!r}: {e}") from e


def load_reward_model(folder: str | os.PathLike) -> tuple[BTRewardModel, object, dict]:
    """``(model, tokenizer, info)`` of a trained reward-model folder (eval mode)."""
    from safetensors.torch import load_file

    from aligndistil.model.loading import ModelLoadError, load_tokenizer

    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise ModelLoadError(f"{folder} is not a complete reward model (no {MARKER}); train one with "
                             "`aligndistil train-rm`")
    info = json.loads(marker.read_text())
    rm = BTRewardModel(_load_body(str(folder)))
    rm.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    rm.eval()
    return rm, load_tokenizer(str(folder)), info


def _features(tokenizer, prompts: list, responses: list[str], use_chat_template: bool, max_length: int | None):
    from aligndistil.data import Example, tokenize_examples, truncate_feature

    exs = [Example(prompt=p if not use_chat_template or isinstance(p, list) else [{"role": "user", "content": p}],
                   where=f"item {i}", completion=r, is_chat=use_chat_template)
           for i, (p, r) in enumerate(zip(prompts, responses))]
    feats = tokenize_examples(exs, tokenizer, "sft", use_chat_template)
    out = []
    for f in feats:
        f2, _, _ = truncate_feature(f, max_length, None, tokenizer.bos_token_id)
        out.append(f2 if f2 is not None else f)
    return out


class BTReward:
    """A trained reward model as a reward callable ``(prompts, responses) -> list[float]``."""

    def __init__(self, folder: str | os.PathLike, batch_size: int = 16):
        self.model, self.tokenizer, self.info = load_reward_model(folder)
        self.name = f"bt:{folder}"
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        chat = bool(self.info.get("use_chat_template", True))
        feats = _features(self.tokenizer, list(prompts), list(responses), chat, self.info.get("max_length"))
        out: list[float] = []
        for i in range(0, len(feats), self.batch_size):
            chunk = feats[i:i + self.batch_size]
            ids, att = pad_with_mask([f["prompt_ids"] + f["completion_ids"] for f in chunk],
                                     self.tokenizer.pad_token_id, side="right")
            out += self.model(ids, att).tolist()
        return out


# Why this loop is not aligndistil.train.loop.Trainer: the Trainer trains a causal LM
# (load_causal_lm, response-token outputs, Method declarations whose losses read per-token
# logits, an HF causal-LM folder with COMPLETE.json and resumable checkpoints). A reward model
# is an ``AutoModel`` body plus a scalar head pooled at the last token, with one pairwise loss
# and its own folder format (reward_head.safetensors, reward_model.json). Routing it through
# the Trainer would need a Method whose "policy" is not a causal LM and a second save format
# there, and would change this model's data order and schedule (so its numbers); for a
# short loop that has no accumulation, no processes and no resume, that is not worth it.
# What the two do share is shared: data (build_dataset, PreferenceCollator), padding and
# position ids (aligndistil.data.collate, aligndistil.model.outputs) and concat_pairs.
def train_reward_model(
    model: str,
    pairs: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 0,
    epochs: float = 1.0,
    learning_rate: float = 1e-5,
    batch_size: int = 8,
    max_length: int = 256,
    max_prompt_length: int = 128,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    use_chat_template: bool | None = None,
    progress: bool = True,
    log=print,
) -> Path:
    """Train a Bradley-Terry reward model on preference pairs and save it to ``out_dir``.

    Args:
        model: the body's initial weights: a causal LM folder, hub id or ``smollm2``.
        pairs: ``{prompt, chosen, rejected}`` JSONL (as written by ``make-prefs``).
        out_dir: the folder to create (replaced if it holds an older complete model).
        steps: optimizer steps; 0 derives them from ``epochs``.
        learning_rate, batch_size (pairs per step), warmup_ratio, weight_decay: AdamW, linear decay.
        max_length, max_prompt_length: token budgets (as in training data).
        seed: head initialisation and data order.
        use_chat_template: as in :func:`aligndistil.data.build_dataset` (None: chat data only).

    Returns:
        ``out_dir``.
    """
    from aligndistil.data import PreferenceCollator, build_dataset, resolve_chat_template
    from aligndistil.model.loading import load_tokenizer

    if learning_rate <= 0 or batch_size <= 0:
        raise ValueError("learning_rate and batch_size must be > 0")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a reward model folder; refusing to replace it")
    torch.manual_seed(seed)  # before the head is built: it seeds the head's initialisation
    tok = load_tokenizer(model)
    feats, report = build_dataset(pairs, tok, "pairs", max_length=max_length, max_prompt_length=max_prompt_length,
                                  use_chat_template=use_chat_template)
    if len(feats) < batch_size:
        raise ValueError(f"{pairs}: {len(feats)} usable pairs are fewer than one batch of {batch_size}")
    chat = resolve_chat_template(tok, use_chat_template) or _pairs_are_chat(pairs)  # build_dataset's rule
    log(f"[train-rm] {pairs}: {report.summary()}")
    rm = BTRewardModel(_load_body(model))
    total = steps if steps > 0 else max(1, int(math.ceil(epochs * (len(feats) // batch_size))))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.time()
    collate = PreferenceCollator(tok.pad_token_id, "pairs")
    try:
        metrics = _fit(rm, feats, collate, tok.pad_token_id, total=total, learning_rate=learning_rate,
                       batch_size=batch_size, warmup_ratio=warmup_ratio, weight_decay=weight_decay, seed=seed,
                       progress=progress)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"base": str(model), "pairs": str(pairs), "steps": total, "learning_rate": learning_rate,
            "batch_size": batch_size, "max_length": max_length, "seed": seed, "use_chat_template": bool(chat),
            "pooling": "last token", "final": metrics[-1], "seconds": round(time.time() - started, 1)}
    _write_folder(rm, tok, metrics, info, tmp, out_dir)
    log(f"[train-rm] {total} steps in {info['seconds']} s -> {out_dir} (last loss {metrics[-1]['loss']:.4f})")
    return out_dir


def _fit(rm: BTRewardModel, feats: list[dict], collate, pad_token_id: int, *, total: int, learning_rate: float,
         batch_size: int, warmup_ratio: float, weight_decay: float, seed: int, progress: bool) -> list[dict]:
    """``total`` AdamW steps on the Bradley-Terry loss; returns one metrics dict per step.

    Data order: a seeded permutation, refilled (a fresh permutation appended) whenever fewer
    than ``batch_size`` indices remain. Learning rate: linear warm-up over the first
    ``warmup_ratio * total`` steps, then linear decay to 0; gradients clipped to norm 1.
    """
    from tqdm.auto import tqdm

    from aligndistil.model.outputs import concat_pairs

    rm.train()
    opt = torch.optim.AdamW(rm.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warm = int(warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    metrics = []
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in tqdm(range(total), desc="train-rm", disable=not progress, dynamic_ncols=True):
        if len(order) < batch_size:
            order += torch.randperm(len(feats), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        ids, att, _ = concat_pairs(collate([feats[i] for i in idx]), pad_token_id)
        r = rm(ids, att)  # (2B,): chosen rows, then rejected rows
        rc, rr = r[:batch_size], r[batch_size:]
        loss = bt_loss(rc, rr).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"train-rm: non-finite loss at step {step + 1}; nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        sched.step()
        metrics.append({"step": step + 1, "loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean()),
                        "margin": float((rc - rr).detach().mean())})
    rm.eval()
    return metrics


def _write_folder(rm: BTRewardModel, tok, metrics: list[dict], info: dict, tmp: Path, out_dir: Path) -> None:
    """Write the model into ``tmp``, ``reward_model.json`` last, then rename it to ``out_dir``."""
    from safetensors.torch import save_file

    rm.body.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in rm.head.state_dict().items()}, str(tmp / HEAD_FILE))
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _pairs_are_chat(pairs) -> bool:
    from aligndistil.data import detect_format, load_records, parse_record

    recs = load_records(pairs)
    return parse_record(recs[0], detect_format(recs)).is_chat
