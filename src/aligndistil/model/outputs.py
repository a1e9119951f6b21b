"""Model outputs aligned to the response tokens they predict: the one place of the shift.

A causal LM fed the packed sequence ``[prompt ; response]`` produces, at input position
``i``, the distribution of the token at position ``i + 1``. So the distribution of the
FIRST response token comes from the LAST prompt position, and the position of the last
response token predicts nothing we train on. Getting this one-position shift wrong is the
most common bug in token-level alignment code (the official AlignDistil code skips the
first response token and distils the position after EOS), so :func:`response_positions`
is the only function in the package that applies it; everything else asks it.

The losses need logits at response tokens only. Running the LM head over every prompt
position would waste a ``(B, L, V)`` tensor (for SmolLM2, V = 49,152), so the model body is
run once, its final hidden states are aligned to response tokens, and only those rows go
through the head. The model is still called through its own ``forward`` (with
``logits_to_keep=1``) so that wrappers such as DDP, DeepSpeed and FSDP see a normal forward
pass; the head is then applied to the aligned rows. For architectures whose logits are not
simply ``lm_head(hidden)`` (logit soft-capping or scaling) the first call detects the
mismatch and falls back to full logits, so the result is always the model's true logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
import weakref

import torch
import torch.nn as nn


@dataclass
class Aligned:
    """Per-response-token tensors, left-justified.

    Attributes:
        values: ``(B, T, ...)`` the logits (or hidden states) whose row ``t`` predicts
            response token ``t`` of each sequence; rows past a sequence's length hold
            values gathered from prompt or padding positions and must be ignored
            through ``mask``.
        labels: ``(B, T)`` long, the response token ids (0 where ``mask`` is 0).
        mask: ``(B, T)`` float, 1 on real response tokens and 0 on padding.
        positions: ``(B, T)`` long, the input position each row was taken from
            (useful to gather other per-position tensors the same way).
    """

    values: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def response_positions(
    input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input positions whose outputs predict response tokens.

    Args:
        input_ids: ``(B, L)`` packed ``[prompt ; response]`` ids, left or right padded.
        response_mask: ``(B, L)`` 1 where the token AT that position is a response token.

    Returns:
        ``positions (B, T)``, ``labels (B, T)``, ``mask (B, T)`` where ``T`` is the
        largest response length in the batch. Row ``t`` of sequence ``b`` is the input
        position ``i`` with ``response_mask[b, i + 1] == 1``, in order; ``labels`` is the
        token at ``i + 1``.

    Raises:
        ValueError: on shape mismatch, a response token at position 0 (nothing precedes
            it, so no position predicts it: prepend BOS or a prompt), or a sequence with
            no response token.
    """
    if input_ids.dim() != 2 or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be (B, L) and equal"
        )
    rmask = response_mask.bool()
    if rmask[:, 0].any():
        raise ValueError(
            "response_mask marks position 0 as a response token; no position predicts "
            "it. Every response needs at least one token (a BOS or prompt) before it."
        )
    # Shift: output at position i predicts token i + 1.
    target_is_response = rmask[:, 1:]
    counts = target_is_response.sum(dim=1)
    if (counts == 0).any():
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"response_mask has no response token in batch rows {bad}")
    T = int(counts.max())
    # A stable sort of "not a response target" puts the response rows first, in order,
    # whatever the padding side.
    order = torch.argsort((~target_is_response).to(torch.int8), dim=1, stable=True)
    positions = order[:, :T]
    mask = torch.arange(T, device=input_ids.device)[None, :] < counts[:, None]
    labels = torch.gather(input_ids[:, 1:], 1, positions) * mask
    return positions, labels, mask.to(torch.float32)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Gather rows ``values[b, positions[b, t]]`` -> ``(B, T, ...)`` (no copy of B*L*V)."""
    B, T = positions.shape
    idx = positions.reshape(B, T, *([1] * (values.dim() - 2)))
    idx = idx.expand(B, T, *values.shape[2:])
    return torch.gather(values, 1, idx)


def align_to_response(
    values: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> Aligned:
    """Drop prompt rows and shift ``values`` so that row ``t`` predicts response token ``t``.

    Args:
        values: ``(B, L, ...)`` logits ``(B, L, V)`` or hidden states ``(B, L, d)`` of a
            causal LM run on ``input_ids``.
        input_ids: ``(B, L)`` packed ``[prompt ; response]`` ids (left or right padding).
        response_mask: ``(B, L)`` 1 where the token at that position belongs to the response.

    Returns:
        :class:`Aligned` with ``values`` of shape ``(B, T, ...)``.
    """
    if values.shape[:2] != input_ids.shape:
        raise ValueError(
            f"values {tuple(values.shape)} do not match input_ids {tuple(input_ids.shape)} "
            "in their first two dimensions"
        )
    positions, labels, mask = response_positions(input_ids, response_mask)
    aligned = gather_positions(values, positions)
    return Aligned(values=aligned, labels=labels, mask=mask.to(values.dtype if values.is_floating_point() else torch.float32), positions=positions)


@dataclass
class ResponseOutputs:
    """Model outputs aligned to response tokens (row ``t`` predicts response token ``t``).

    Attributes:
        logits: ``(B, T, V)``, or None when only hidden states were asked for (the fused
            losses compute logits chunk by chunk from ``hidden`` and ``head``).
        labels: ``(B, T)`` response token ids.
        mask: ``(B, T)`` float response mask.
        hidden: ``(B, T, d)`` final hidden states that produce the logits.
        all_hidden: ``(L+1, B, T, d)`` every layer's hidden states (embeddings first), when asked.
        activations: aligned ``(B, T, d)`` attention/MLP/residual activations, when asked (MaPO).
        head: ``(weight (V, d), bias (V,) or None)`` of the LM head when the logits are exactly
            ``hidden @ weight^T + bias`` for this model, else None.
    """

    logits: torch.Tensor | None
    labels: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor
    all_hidden: torch.Tensor | None = None
    activations: list = field(default_factory=list)
    head: tuple | None = None

    def head_logits(self) -> torch.Tensor:
        """The logits: ``logits`` if computed, else ``hidden @ W^T + b`` (B x T x V, plain path)."""
        if self.logits is not None:
            return self.logits
        if self.head is None:
            raise ValueError("these outputs hold neither logits nor a linear head")
        weight, bias = self.head
        return torch.nn.functional.linear(self.hidden.to(weight.dtype), weight, bias)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying HF model of a DDP/compiled wrapper (for attribute access only)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens: ``(B, L) -> (B, L)`` long.

    The first attended token of each row gets position 0 whatever padding precedes it, so a
    LEFT-padded prompt sees the same positions as the unpadded one (HF models otherwise
    count padding). Padding before the first real token gets 0; padding after the last
    repeats its position: both are masked out of attention, so their value does not matter.
    Every forward pass of the package (training, sampling, evaluation, the reward model)
    takes its position ids from here.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Per model (weakly held, so a new model that reuses a freed model's id is checked afresh).
_HEAD_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_ACTIVATION_RE = re.compile(r"layers\.\d+\.(self_attn|attn|attention|mlp|feed_forward)$")


def _activation_modules(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in unwrap(model).named_modules() if _ACTIVATION_RE.search(name)]


def _decoder(model: nn.Module) -> nn.Module | None:
    """The causal LM's decoder stack (whose output is the final hidden state), or None when
    the model does not name one apart from itself."""
    net = unwrap(model)
    try:
        dec = net.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return dec if isinstance(dec, nn.Module) and dec is not net else None


def linear_head(model: nn.Module) -> tuple | None:
    """``(weight, bias)`` of the model's LM head if it is a plain ``nn.Linear`` (tied or not),
    else None (e.g. a LoRA-wrapped head, whose logits are not ``hidden @ weight^T``)."""
    head = unwrap(model).get_output_embeddings()
    if head is None or type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear):
        return None
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: partitioned, 0 elements outside the head's forward
        return _zero3_gathered(head)
    # FSDP2 leaves the root's weights (the head's among them) gathered after a forward; a head
    # read while sharded is a DTensor, gathered here (differentiably) rather than used as a shard.
    weight, bias = (p.full_tensor() if hasattr(p, "full_tensor") else p for p in (head.weight, head.bias))
    return weight, bias


def _zero3_gathered(head: nn.Linear) -> tuple:
    """``(weight, bias)`` of a ZeRO-3 partitioned head as whole tensors that autograd links to
    the parameters: the head is called with a forward that returns copies of them, so
    DeepSpeed's own hooks gather the parameters around the call and again in backward, where
    the copies' gradients reach the parameters and DeepSpeed reduces and partitions them.
    The fused losses read the weight outside any module's forward (never calling the head),
    which ZeRO-3 would otherwise see as an empty tensor. Costs one copy of the head per call."""
    def copies(_rows):
        return head.weight * 1, None if head.bias is None else head.bias * 1

    head.forward = copies
    try:
        return head(torch.empty(0))
    finally:
        del head.forward  # back to the class's forward


def _low_precision(model: nn.Module, head: nn.Module) -> bool:
    """True when the model's logits come out of half-precision arithmetic: bf16/fp16 head
    weights, or a forward wrapped by ``accelerate``'s mixed-precision autocast (which leaves
    ``_original_forward`` on the model and hands back fp32 copies of bf16 results)."""
    return head.weight.dtype in (torch.bfloat16, torch.float16) or hasattr(unwrap(model), "_original_forward")


def _logits_are_linear_head(model: nn.Module, ref: torch.Tensor, mine: torch.Tensor) -> bool:
    """One-time check that this architecture's logits are ``lm_head(final hidden)``.

    Soft-capping (Gemma 2) or a logit scale (Cohere) make them differ; those models take the
    full-logit path. The tolerance follows the arithmetic the model's own logits came from:
    under bf16 autocast they carry ~2^-8 relative rounding that the fp32 head applied here
    does not, and a 1e-4 tolerance would then silently turn the fused path off for the run.
    Declared soft-capping / scaling is refused outright, whatever the numbers say, because a
    cap of 30 changes logits of size ~5 by under 1%.
    """
    conf = getattr(unwrap(model), "config", None)
    if getattr(conf, "final_logit_softcapping", None) or getattr(conf, "logit_scale", 1.0) not in (1, 1.0, None):
        return False
    if ref.shape != mine.shape:
        return False
    ref, mine = ref.float(), mine.float()
    tol = 3e-2 if _low_precision(model, unwrap(model).get_output_embeddings()) else 1e-4
    return bool(torch.allclose(ref, mine, rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1.0))))


def uses_linear_head(model: nn.Module) -> bool | None:
    """Whether :func:`response_outputs` found ``logits == lm_head(hidden)`` for ``model`` (so the
    fused path applies to it): True/False once it has run on the model, else None."""
    return _HEAD_OK.get(unwrap(model))


def response_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    all_hidden: bool = False,
    activations: bool = False,
    compute_logits: bool = True,
) -> ResponseOutputs:
    """Forward ``[prompt ; response]`` and return outputs at response-predicting positions.

    Args:
        model: a causal LM (possibly wrapped by accelerate).
        input_ids, attention_mask, response_mask: ``(B, L)``, left or right padded.
        all_hidden: also return every layer's aligned hidden states (SparsePO masks).
        activations: also return aligned attention/MLP outputs and residual streams (MaPO).
        compute_logits: apply the LM head to the aligned rows. With False, ``logits`` is
            None and ``head`` holds the head's weights, so a fused loss can compute the
            logits chunk by chunk; if the model's logits are not a plain linear map of the
            final hidden state (soft-capping, a wrapped head), logits are computed anyway
            and ``head`` is None.
    """
    positions, labels, mask = response_positions(input_ids, response_mask)
    hooks, captured, final = [], [], []
    if activations:
        def hook(_module, _inp, out):
            captured.append(out[0] if isinstance(out, tuple) else out)
        hooks = [m.register_forward_hook(hook) for m in _activation_modules(model)]
    # Only the final hidden state is needed unless every layer's is asked for: it is taken
    # from the decoder's output, so a frozen model's forward (no autograd) does not keep
    # every layer's (B, L, d) hidden states alive at once.
    every_layer = all_hidden or activations or (decoder := _decoder(model)) is None
    if not every_layer:
        hooks.append(decoder.register_forward_hook(
            lambda _m, _i, out: final.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=every_layer,
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        for h in hooks:
            h.remove()
    hidden_states = out.hidden_states if every_layer else None
    final_hidden = hidden_states[-1] if every_layer else final[-1]
    last = gather_positions(final_hidden, positions)
    head = unwrap(model).get_output_embeddings()
    key = unwrap(model)
    if key not in _HEAD_OK:
        with torch.no_grad():
            _HEAD_OK[key] = _logits_are_linear_head(model, out.logits[:, -1], head(final_hidden[:, -1]))
    lin = linear_head(model) if _HEAD_OK[key] else None
    if _HEAD_OK[key]:
        logits = head(last) if (compute_logits or lin is None) else None
    else:
        full = model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
        logits = gather_positions(full, positions)
    # Masks are never half precision: bf16 lengths round (|y| = 257 is stored as 256) and bf16
    # alpha_t would too. float64 models (the float64 tests) keep float64 masks.
    mask_dtype = torch.float64 if last.dtype == torch.float64 else torch.float32
    res = ResponseOutputs(logits=logits, labels=labels, mask=mask.to(mask_dtype), hidden=last, head=lin)
    if all_hidden:
        res.all_hidden = torch.stack([gather_positions(h, positions) for h in hidden_states])
    if activations:
        acts = [a for a in captured if a.dim() == 3 and a.shape[:2] == input_ids.shape]
        acts += list(hidden_states[1:])  # residual stream after every layer
        res.activations = [gather_positions(a, positions) for a in acts]
    return res


def concat_pairs(batch: dict, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one ``(2B, L)`` batch, for a single forward pass."""
    L = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def padded(x, value):
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=value)

    ids = torch.cat([padded(batch["chosen_input_ids"], pad_token_id), padded(batch["rejected_input_ids"], pad_token_id)])
    att = torch.cat([padded(batch["chosen_attention_mask"], 0), padded(batch["rejected_attention_mask"], 0)])
    resp = torch.cat([padded(batch["chosen_response_mask"], 0), padded(batch["rejected_response_mask"], 0)])
    return ids, att, resp


def split_pair(out: ResponseOutputs, B: int) -> tuple[ResponseOutputs, ResponseOutputs]:
    """Undo :func:`concat_pairs` on aligned outputs: ``(2B, T, ...)`` -> chosen, rejected."""
    def part(sl):
        return ResponseOutputs(
            logits=None if out.logits is None else out.logits[sl], labels=out.labels[sl], mask=out.mask[sl],
            hidden=out.hidden[sl], all_hidden=None if out.all_hidden is None else out.all_hidden[:, sl],
            activations=[a[sl] for a in out.activations], head=out.head,
        )
    return part(slice(0, B)), part(slice(B, 2 * B))


def pair_outputs(model: nn.Module, batch: dict, **kw) -> tuple[ResponseOutputs, ResponseOutputs]:
    """Chosen and rejected response outputs from one forward pass over both."""
    ids, att, resp = concat_pairs(batch)
    return split_pair(response_outputs(model, ids, att, resp, **kw), batch["chosen_input_ids"].shape[0])
