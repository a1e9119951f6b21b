"""Sampling responses from a policy, packed so that the mask covers exactly the sample.

On-policy methods (AlignDistil Eq. 18) sample ``y ~ pi_theta(.|x)`` at every step and then
treat the sampled tokens as data: no gradient flows through sampling. The packing here is
the part that is easy to get wrong: generation pads prompts on the LEFT and keeps emitting
padding after a sequence's EOS, so the response mask must start right after the prompt and
stop AT the first EOS (included, so the policy learns to stop), and everything after it
must be masked out of both attention and loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .modeling import unwrap


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
) -> dict[str, torch.Tensor]:
    """Sample responses and pack them as a training batch.

    Args:
        model: the policy (an accelerate wrapper is unwrapped for ``generate``).
        prompt_input_ids, prompt_attention_mask: ``(B, Lp)`` LEFT-padded prompts.
        max_new_tokens, temperature, top_p, do_sample: generation settings.
        num_samples: responses per prompt; rows are grouped per prompt
            (``[p0 s0, p0 s1, ..., p1 s0, ...]``).
        eos_token_id: id or list of ids ending a response (default: the model's).
        pad_token_id: id written after EOS.

    Returns:
        ``input_ids``, ``attention_mask``, ``response_mask``: ``(B * num_samples, Lp + N)``;
        ``response_mask`` is 1 exactly on the sampled tokens up to and including the first
        EOS, ``attention_mask`` is 0 on left padding and after that EOS.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    net = unwrap(model)
    eos = _eos_ids(net, eos_token_id)
    was_training = net.training
    net.eval()
    try:
        ids = prompt_input_ids.repeat_interleave(num_samples, dim=0)
        att = prompt_attention_mask.repeat_interleave(num_samples, dim=0)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                      eos_token_id=eos or None)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        out = net.generate(input_ids=ids, attention_mask=att, **kwargs)
    finally:
        net.train(was_training)
    Lp = ids.shape[1]
    generated = out[:, Lp:]
    gen_mask = response_mask_after_eos(generated, eos)
    # A sample that is EOS at its first step has exactly one response token (the EOS):
    # still a valid (short) response, never an empty one.
    generated = torch.where(gen_mask.bool(), generated, torch.full_like(generated, pad_token_id))
    input_ids = torch.cat([ids, generated], dim=1)
    attention_mask = torch.cat([att, gen_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(att), gen_mask], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
