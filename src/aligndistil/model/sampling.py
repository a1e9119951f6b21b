"""Sampling responses from a policy, packed so that the mask covers exactly the sample.

On-policy methods (AlignDistil Eq. 18) sample ``y ~ pi_theta(.|x)`` at every step and then
treat the sampled tokens as data: no gradient flows through sampling. The packing here is
the part that is easy to get wrong: generation pads prompts on the LEFT and keeps emitting
padding after a sequence's EOS, so the response mask must start right after the prompt and
stop AT the first EOS (included, so the policy learns to stop), and everything after it
must be masked out of both attention and loss.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from aligndistil.data.collate import pad_with_mask
from aligndistil.data.tokenize import render_prompt
from aligndistil.model.outputs import position_ids_from_mask, unwrap


def response_mask_after_eos(generated: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """``(B, N)`` mask over generated tokens: 1 up to and including the first EOS, then 0.

    A row without EOS (cut by ``max_new_tokens``) keeps all its tokens.
    """
    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= generated == e
    # Tokens strictly after the first EOS have a nonzero count of EOS before them.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


def _eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = unwrap(model).generation_config.eos_token_id
    if eos_token_id is None:
        return []
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    do_sample: bool = True,
    eos_token_id=None,
    pad_token_id: int = 0,
    seeds: list[int] | None = None,
    all_done=None,
) -> dict[str, torch.Tensor]:
    """Sample responses from the policy's own distribution and pack them as a training batch.

    On-policy methods need ``y ~ pi_theta``: the model's softmax at ``temperature``, within
    the ``top_p`` nucleus, and nothing else. HF ``generate`` would fill every setting we do
    not pass from the checkpoint's ``generation_config`` (a ``repetition_penalty``,
    ``suppress_tokens``, ``top_k``, ``no_repeat_ngram_size`` ...), silently drawing from
    another distribution than the one the loss assumes. So sampling is
    :func:`sample_with_logprobs`, whose only settings are ours.

    Args:
        model: the policy (an accelerate wrapper is unwrapped).
        prompt_input_ids, prompt_attention_mask: ``(B, Lp)`` LEFT-padded prompts.
        max_new_tokens, temperature, top_p: generation settings; ``do_sample=False`` takes
            the most likely token at every step (greedy).
        num_samples: responses per prompt; rows are grouped per prompt
            (``[p0 s0, p0 s1, ..., p1 s0, ...]``).
        eos_token_id: id or list of ids ending a response (default: the model's).
        pad_token_id: id written after EOS.
        seeds: one per row (``B * num_samples``); default: drawn from torch's global CPU
            generator, so that a run's samples follow ``train.seed`` and a resume that
            restores the RNG state draws the same ones.
        all_done: for a sharded model, see :func:`sample_with_logprobs`.

    Returns:
        ``input_ids``, ``attention_mask``, ``response_mask``: ``(B * num_samples, Lp + N)``;
        ``response_mask`` is 1 exactly on the sampled tokens up to and including the first
        EOS, ``attention_mask`` is 0 on left padding and after that EOS; and ``ended``
        ``(B * num_samples,)`` bool, whether the row emitted EOS (False: cut by
        ``max_new_tokens``).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    eos = _eos_ids(unwrap(model), eos_token_id)
    ids = prompt_input_ids.repeat_interleave(num_samples, dim=0)
    att = prompt_attention_mask.repeat_interleave(num_samples, dim=0)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (ids.shape[0],)).tolist()
    # Greedy: a nucleus of (almost) zero mass keeps only the most likely token.
    out = sample_with_logprobs(
        model, ids, att, max_new_tokens=max_new_tokens, seeds=seeds,
        temperature=temperature if do_sample else 1.0, top_p=top_p if do_sample else 1e-12,
        eos_token_ids=eos, pad_token_id=pad_token_id, all_done=all_done,
    )
    # A sample that is EOS at its first step has exactly one response token (the EOS):
    # still a valid (short) response, never an empty one.
    packed = pack_samples(ids, att, out["tokens"], out["mask"])
    packed["ended"] = out["ended"]
    return packed


def pack_samples(
    prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``[prompt ; sample]`` as a batch for :func:`aligndistil.model.outputs.response_outputs`.

    Args:
        prompt_input_ids, prompt_attention_mask: ``(B, Lp)`` LEFT-padded prompts.
        tokens: ``(B, N)`` sampled ids, padding after each row's EOS.
        mask: ``(B, N)`` 1 on the sampled tokens up to and including the first EOS.

    Returns:
        ``input_ids``, ``attention_mask`` and ``response_mask``, each ``(B, Lp + N)``:
        the response mask is ``mask`` behind zeros over the prompt, the attention mask is
        the prompt's followed by ``mask`` (padding after EOS is not attended).
    """
    return {
        "input_ids": torch.cat([prompt_input_ids, tokens], dim=1),
        "attention_mask": torch.cat([prompt_attention_mask, mask], dim=1),
        "response_mask": torch.cat([torch.zeros_like(prompt_attention_mask), mask], dim=1),
    }


# --------------------------------------------------------------------------------------
# Generation for data and evaluation: text in, text out, reproducible per prompt.
# --------------------------------------------------------------------------------------
#
# :func:`sample_with_logprobs` is a small KV-cache sampling loop that gives each row its own
# seeded random stream (Gumbel-max sampling), so row ``i`` depends only on its seed, its
# prompt and the model, and returns the model's own log-probabilities. Making preference
# data and evaluating need exactly that (the same prompt gets the same sample whatever the
# batch size, two models are compared on the same random draws, the Monte-Carlo KL needs
# each sample's log-probability); ``sample_responses`` above uses it too, with seeds drawn
# from the global RNG, because it applies our temperature and top-p and nothing else.


def row_seed(seed: int, prompt_index: int, sample_index: int = 0) -> int:
    """The seed of one sample's random stream (distinct for < 1000 samples per prompt)."""
    return (int(seed) * 1_000_000_007 + int(prompt_index) * 1000 + int(sample_index)) % (2**63 - 1)


def encode_prompts(tokenizer, prompts: list[str], use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its response.

    With ``use_chat_template`` a prompt is one user message rendered with the tokenizer's
    chat template and the assistant header (the way :mod:`aligndistil.data` renders string
    prompts of chat data), so generation, training and evaluation see identical prompts.
    Without it the text is used as is, with BOS prepended when the tokenizer has one.
    """
    texts = [render_prompt(p, tokenizer, use_chat_template, where=f"prompt {i}") for i, p in enumerate(prompts)]
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    bos = tokenizer.bos_token_id
    if not use_chat_template and bos is not None:
        ids = [x if x and x[0] == bos else [bos] + x for x in ids]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to no tokens")
    return ids


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation-config EOS ids, plus the
    tokenizer's EOS when the config lacks it (chat models often stop on a turn-end token
    that only the tokenizer names, or the reverse)."""
    eos = _eos_ids(unwrap(model), None)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def decode_sample(tokenizer, out: dict[str, torch.Tensor], row: int) -> dict:
    """Row ``row`` of a :func:`sample_with_logprobs` result as text.

    Returns ``response`` (the decoded tokens before EOS, special tokens skipped, stripped),
    ``n_tokens`` (response tokens before EOS), ``ended`` (EOS emitted) and ``logp`` (the
    summed log-probability of the sampled tokens, EOS included).
    """
    n = int(out["mask"][row].sum())
    ended = bool(out["ended"][row])
    body = out["tokens"][row, : n - 1 if ended else n].tolist()  # the EOS itself is not text
    return {"response": tokenizer.decode(body, skip_special_tokens=True).strip(), "n_tokens": len(body),
            "ended": ended, "logp": float(out["logps"][row].detach().sum())}


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-p nucleus set to -inf (at least one kept)."""
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep a token if the mass strictly before it is < top_p
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@torch.no_grad()
def _kv_cache(net, out):
    """The KV cache a forward returned, and the keyword that passes it back in.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns on every
    call and goes away in 5.40); older versions only know ``past_key_values``."""
    if hasattr(out, "cache") or "cache" in inspect.signature(net.forward).parameters:
        return getattr(out, "cache", None), "cache"
    return out.past_key_values, "past_key_values"


def sample_with_logprobs(
    model: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    seeds: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int = 0,
    return_logits: bool = False,
    all_done=None,
) -> dict[str, torch.Tensor]:
    """Sample one response per row with a KV cache; every row has its own random stream.

    Sampling is Gumbel-max: token ``argmax_v (z_v / T + g_v)`` with ``g`` drawn from a
    ``torch.Generator`` seeded with ``seeds[row]``, restricted to the top-p nucleus. That is
    exactly a draw from ``softmax(z / T)`` (nucleus-truncated), and row ``b``'s draw depends
    only on ``seeds[b]``, its prompt and the model, not on the batch it shares.

    Args:
        model: a causal LM (an accelerate wrapper is unwrapped).
        prompt_input_ids, prompt_attention_mask: ``(B, Lp)`` LEFT-padded prompts.
        max_new_tokens: the most tokens per response (EOS included).
        seeds: one seed per row.
        temperature, top_p: sampling settings. Only ``temperature=1, top_p=1`` draws from the
            model's own distribution (what a Monte-Carlo KL estimate assumes).
        eos_token_ids: ids that end a response (default: the model's generation config).
        pad_token_id: written after a row's EOS.
        return_logits: also return the model's logits ``(B, N, V)`` at every sampled position.
        all_done: ``all_done(mine) -> bool``, whether every process's rows have ended given
            whether this one's have, for a sharded model (FSDP, ZeRO-3) whose every forward is
            a collective: the processes then stop together (rows already ended get padding),
            where stopping alone would leave the others waiting in their next forward.
            None: stop when this process's rows have ended.

    Returns:
        ``tokens (B, N)`` (pad after EOS), ``mask (B, N)`` (1 up to and including the first
        EOS), ``logps (B, N)`` the log-probability of each token under the model at
        temperature 1 (0 where ``mask`` is 0), ``ended (B,)`` whether the row emitted EOS,
        and ``logits (B, N, V)`` when asked. ``N <= max_new_tokens`` (the loop stops when
        every row has ended).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B = prompt_input_ids.shape[0]
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} rows")
    net = unwrap(model)
    eos = eos_token_ids if eos_token_ids is not None else _eos_ids(net, None)
    device = prompt_input_ids.device
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    was_training = net.training
    net.eval()
    try:
        att = prompt_attention_mask.long()
        pos = position_ids_from_mask(att)
        out = net(input_ids=prompt_input_ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        cache, cache_kw = _kv_cache(net, out)
        next_pos = pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool, device=device)
        toks, masks, logps, all_logits = [], [], [], []
        eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        for t in range(max_new_tokens):
            logp_full = torch.log_softmax(logits, dim=-1)
            scaled = _nucleus(logits / temperature, top_p)
            V = scaled.shape[-1]
            u = torch.stack([torch.rand(V, generator=g) for g in gens]).to(device)
            expo = -torch.log(u.clamp_min(1e-20))  # Exp(1) draws
            gumbel = -torch.log(expo.clamp_min(1e-20))
            nxt = torch.argmax(scaled + gumbel, dim=-1)
            live = ~done
            nxt = torch.where(live, nxt, torch.full_like(nxt, int(pad_token_id)))
            toks.append(nxt)
            masks.append(live.long())
            logps.append(torch.where(live, logp_full.gather(-1, nxt[:, None]).squeeze(-1), torch.zeros_like(logits[:, 0])))
            if return_logits:
                all_logits.append(logits)
            if eos_t is not None:
                done = done | (live & torch.isin(nxt, eos_t))
            ended = bool(done.all())
            if t == max_new_tokens - 1 or (all_done(ended) if all_done is not None else ended):
                break
            att = torch.cat([att, (~done).long()[:, None]], dim=1)
            out = net(input_ids=nxt[:, None], attention_mask=att, position_ids=next_pos[:, None],
                      use_cache=True, **{cache_kw: cache})
            cache, _ = _kv_cache(net, out)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
    finally:
        net.train(was_training)
    res = {
        "tokens": torch.stack(toks, dim=1),
        "mask": torch.stack(masks, dim=1),
        "logps": torch.stack(logps, dim=1),
        "ended": done,
    }
    if return_logits:
        res["logits"] = torch.stack(all_logits, dim=1)
    return res


@torch.no_grad()  # texts and floats out: an autograd graph over every step would only hold memory
def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    use_chat_template: bool = True,
    progress: bool = False,
    desc: str = "generate",
    on_batch=None,
) -> list[dict]:
    """Sample ``num_samples`` responses per prompt and decode them.

    Returns one dict per sample, grouped per prompt, with ``prompt``, ``prompt_index``,
    ``sample_index``, ``response`` (decoded text before EOS), ``n_tokens`` (response tokens
    before EOS), ``ended`` (EOS emitted) and ``logp`` (log-probability of the sampled tokens,
    EOS included, under the model at temperature 1). The same ``seed`` gives the same
    samples for any ``batch_size`` (see :func:`sample_with_logprobs`). ``on_batch``, if
    given, is called with each batch's list of dicts as soon as it is decoded (to score
    responses early, so that a failing reward stops the run before all sampling is done).
    """
    from tqdm.auto import tqdm

    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(model, tokenizer)
    enc = encode_prompts(tokenizer, prompts, use_chat_template)
    rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
    results = []
    device = next(unwrap(model).parameters()).device
    with tqdm(total=len(rows), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, att = pad_with_mask([enc[i] for i, _ in chunk], pad, side="left")
            out = sample_with_logprobs(
                model, ids.to(device), att.to(device), max_new_tokens=max_new_tokens,
                seeds=[row_seed(seed, i, s) for i, s in chunk], temperature=temperature, top_p=top_p,
                eos_token_ids=eos, pad_token_id=pad,
            )
            batch_results = [{"prompt": prompts[i], "prompt_index": i, "sample_index": s,
                              **decode_sample(tokenizer, out, b)} for b, (i, s) in enumerate(chunk)]
            if on_batch is not None:
                on_batch(batch_results)
            results.extend(batch_results)
            bar.update(len(chunk))
    return results
