"""The engine of the fused path: per-token statistics from hidden states and head weights, never ``B x T x V``.

Every token-level loss in this package needs, at each response token, one or more
full-vocabulary distributions: the policy's (and its gradient), the reference's (TDPO,
SparsePO), or two teachers' (AlignDistil). Computed plainly, each is a ``(B, T, V)`` fp32
tensor; a step holds five or more of them. The fused path computes the same per-token
statistics from the final hidden states and the LM head weights, over chunks of
``chunk_size`` response rows at a time, and never allocates more than a few
``chunk_size x V`` buffers.

This module is the generic machinery; what a chunk computes is a :class:`Kernel`
(:mod:`aligndistil.losses.fused.kernels`: label log-prob, forward KL, reverse KL, teacher
TVD). The engine

- gathers the masked rows of one or more row groups (:func:`run_kernel`), prepares the heads
  (:class:`Head`: matmul and accumulation dtypes) and sizes the chunks (:func:`auto_chunk_rows`);
- runs the kernel chunk by chunk inside a :class:`torch.autograd.Function` whose backward
  multiplies each row's analytic gradient with respect to the policy's logits by the
  upstream gradient that row receives, so masks, sequence weights and learned mask
  parameters get their gradients from ordinary autograd;
- turns a chunk's logit gradient ``G`` (rows x V) into the hidden-state gradient ``G @ W``
  and accumulates the head's ``G^T @ h`` (``G.sum(0)`` for a bias). Tied and untied
  embeddings both work: the head weight is an ordinary input, and autograd adds its gradient
  to the embedding when they are the same parameter.

Backward normally recomputes each chunk's logits (one extra matmul per head). When the
caller knows each row's upstream gradient up to one constant factor (AlignDistil: the loss
is linear in the per-token KL, :func:`aligndistil.losses.aligndistil.kl_row_weight`), it
passes that as ``row_weight``; the forward then computes the gradients right away and the
backward only rescales them, after checking that the incoming gradient really is
proportional to ``row_weight`` (if it is not, it recomputes, so the result is always exact).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from aligndistil.losses.checks import check_mask

# Rows per chunk. "auto" picks them from a byte budget for the chunk's full-vocabulary fp32
# buffers, because what a chunk costs is rows x V: 256 rows are 50 MB per buffer at
# SmolLM2's V=49,152 but 156 MB at Qwen2.5's V=151,936. The budget trades memory for speed:
# each chunk re-reads every head's V x d weights, so fewer, larger chunks are faster
# (benchmarks/bench_loss.py; BENCHMARKS.md has the measured sweep).
DEFAULT_CHUNK_SIZE = "auto"
AUTO_CHUNK_BYTES = 128 * 2**20
# A GPU wants larger chunks: at 64 rows (the CPU budget at V=151,936) the head matmuls are
# small and memory-bound. Measured on an H200 (benchmarks/results/gpu-check.md, AlignDistil
# loss side, 4,096 rows): 244 ms at 64 rows, 89 ms at 512, 83 ms at 1,024, plain 67 ms; peak
# 2.8 / 3.7 / 4.7 GiB against 24.8 GiB for the plain path. 1 GiB of buffers gives 576 rows there
# (432 with bf16 heads, which need one more buffer).
AUTO_CHUNK_BYTES_CUDA = 2**30
AUTO_CHUNK_MULTIPLE, AUTO_CHUNK_MAX = 16, 4096

# How often a backward rescaled the forward's precomputed gradients vs. recomputed them
# (for tests and benchmarks; never read by the code).
STATS = {"rescaled": 0, "recomputed": 0}


# ----------------------------------------------------------------------------- inputs
@dataclass
class HeadRows:
    """The logits ``hidden @ weight^T + bias`` of one model, not yet computed.

    The fused producers take ``HeadRows`` where their plain counterparts take logits, with
    the same argument order, so a caller switches path by switching function.

    Attributes:
        hidden: ``(B, T, d)`` final hidden states aligned to response tokens (row ``t``
            predicts response token ``t``), e.g. ``modeling.response_outputs(...).hidden``.
        weight: ``(V, d)`` the model's LM head (output embedding) weight.
        bias: ``(V,)`` the head's bias, or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: ``(B, T, V)``."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def check(self, name: str) -> None:
        if not isinstance(self.hidden, torch.Tensor) or self.hidden.dim() != 3:
            raise ValueError(f"{name}.hidden must be a (B, T, d) tensor")
        if self.weight.dim() != 2:
            raise ValueError(f"{name}.weight must be the (V, d) LM head weight, got {tuple(self.weight.shape)}")
        if self.hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"{name}: hidden size {self.hidden.shape[-1]} does not match the LM head, which takes "
                f"{self.weight.shape[1]} features (weight {tuple(self.weight.shape)})"
            )
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"{name}.bias has shape {tuple(self.bias.shape)}, expected ({self.weight.shape[0]},)")


def check_rows(name: str, z: HeadRows, labels: torch.Tensor, mask: torch.Tensor, vocab: int | None = None) -> None:
    """``z`` is a valid :class:`HeadRows` with a ``(B, T)`` mask and in-vocabulary labels."""
    if not isinstance(z, HeadRows):
        raise ValueError(f"{name} must be HeadRows (final hidden states + LM head) on the fused path")
    z.check(name)
    check_mask(f"mask of {name}", mask, z.hidden.shape[:2])
    if labels.shape != mask.shape:
        raise ValueError(f"labels of {name} have shape {tuple(labels.shape)}, expected {tuple(mask.shape)}")
    V = z.weight.shape[0]
    if vocab is not None and V != vocab:
        raise ValueError(f"{name} has a vocabulary of {V} but the policy has {vocab}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= V):
        raise ValueError(f"labels of {name} have ids outside [0, {V})")


def check_same_rows(name: str, z: HeadRows, like: HeadRows) -> None:
    """``z`` has the ``(B, T)`` rows of ``like``."""
    if z.hidden.shape[:2] != like.hidden.shape[:2]:
        raise ValueError(f"{name} has {tuple(z.hidden.shape[:2])} rows, expected {tuple(like.hidden.shape[:2])}")


def check_chunk_size(chunk_size) -> int | str:
    """A chunk size is a positive integer (rows per chunk) or ``"auto"``."""
    if chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or 'auto', got {chunk_size!r}")
    return chunk_size


def auto_chunk_rows(n_buffers: int, vocab_size: int, bytes_per_value: int = 4, device_type: str = "cpu") -> int:
    """Rows whose ``n_buffers`` full ``rows x vocab_size`` buffers fit in :data:`AUTO_CHUNK_BYTES`
    (:data:`AUTO_CHUNK_BYTES_CUDA` on a GPU), rounded down to a multiple of 16 and kept
    within ``[16, 4096]``.

    E.g. AlignDistil's kernel (3 fp32 buffers) on a CPU: 224 rows at V=49,152, 64 rows at
    V=151,936; on a GPU 576 rows at V=151,936.
    """
    budget = AUTO_CHUNK_BYTES_CUDA if device_type == "cuda" else AUTO_CHUNK_BYTES
    rows = budget // max(1, n_buffers * vocab_size * bytes_per_value)
    rows = rows // AUTO_CHUNK_MULTIPLE * AUTO_CHUNK_MULTIPLE
    return int(min(AUTO_CHUNK_MAX, max(AUTO_CHUNK_MULTIPLE, rows)))


def _chunk_rows(chunk_size, kernel: "Kernel", V: int, n_rows: int, low: bool, device_type: str = "cpu") -> int:
    """The rows per chunk actually used (never more than there are rows)."""
    if chunk_size == "auto":
        chunk_size = auto_chunk_rows(kernel.n_buffers + (1 if low else 0), V, device_type=device_type)
    return min(chunk_size, max(n_rows, 1))


# ----------------------------------------------------------------------------- heads and dtypes
@functools.lru_cache(maxsize=1)
def fast_bf16_cpu() -> bool:
    """True if this CPU has native bf16 matmul (AVX512-BF16 or AMX); without it bf16 is far slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mm_dtype(weight: torch.Tensor) -> torch.dtype:
    """Matmul dtype: the weight's, except half precision on a CPU without fast bf16 (then fp32)."""
    if weight.dtype in (torch.float32, torch.float64) or weight.device.type != "cpu":
        return weight.dtype
    return weight.dtype if (weight.dtype == torch.bfloat16 and fast_bf16_cpu()) else torch.float32


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    """Dtype of the softmax arithmetic and the accumulated gradients: fp32 (fp64 for fp64 heads)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# On CUDA a bf16 x bf16 matmul can write its fp32 accumulator out directly (``out_dtype``).
# Without it the logits are rounded to bf16 before the softmax, and AlignDistil's teacher
# ``(1 + alpha) z_dpo - alpha z_rev`` multiplies that error by about ``2 alpha + 1`` (21 at
# r = 10). benchmarks/gpu_check.py measures both settings against float64.
FP32_OUT_MATMUL = True
_FP32_OUT_OK: dict = {}


def _fp32_out_mm(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """``out <- h @ w^T`` computed from half-precision ``h, w`` with an fp32 result, if this
    device and torch support it (probed once per device type); False otherwise."""
    dev = h.device.type
    if dev != "cuda" or _FP32_OUT_OK.get(dev) is False:
        return False
    try:
        torch.mm(h, w.t(), out_dtype=out.dtype, out=out)
    except (RuntimeError, TypeError):
        _FP32_OUT_OK[dev] = False
        return False
    _FP32_OUT_OK[dev] = True
    return True


# The head-weight gradient of a half-precision head: ``acc += G^T @ h`` summed over chunks
# in fp32. Computed as ``mm`` then ``.to(fp32)`` it makes two V x d temporaries per chunk (a
# bf16 product and its fp32 copy: 0.47 + 0.93 GB at Qwen2.5-1.5B's head); ``addmm`` with
# ``out_dtype`` accumulates the bf16 product into the fp32 sum directly. Only CUDA has that
# kernel (this CPU build has none), so it is probed on first use, and its first result is
# checked against the two-step product; any error or disagreement switches it off.
ADDMM_DEVICES = ("cuda",)
_FP32_ADDMM_OK: dict = {}


def fp32_out_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``acc += a @ b`` from half-precision ``a, b`` into the fp32 ``acc`` with no half or
    fp32 temporary of ``acc``'s size, if this device supports it; False (``acc`` untouched)
    when it does not."""
    dev = a.device.type
    if dev not in ADDMM_DEVICES or _FP32_ADDMM_OK.get(dev) is False:
        return False
    if _FP32_ADDMM_OK.get(dev):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return True
    ref = acc + torch.mm(a, b).to(acc.dtype)  # the two-step result, once, to check the kernel by
    try:
        got = torch.addmm(acc, a, b, out_dtype=acc.dtype)
    except (RuntimeError, TypeError):
        _FP32_ADDMM_OK[dev] = False
        return False
    scale = float(ref.abs().max().clamp_min(1e-30))
    _FP32_ADDMM_OK[dev] = bool(torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * scale))
    acc.copy_(got if _FP32_ADDMM_OK[dev] else ref)
    return True


class Head:
    """A head prepared for chunked use: weight/bias/rows in the matmul dtype."""

    def __init__(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.dtype = _mm_dtype(weight)
        self.acc = _acc_dtype(weight)
        self.rows = rows.to(self.dtype)
        self.weight = weight.to(self.dtype)
        self.bias = None if bias is None else bias.to(self.acc)

    def logits_into(self, out: torch.Tensor, sl: slice, tmp: torch.Tensor | None) -> torch.Tensor:
        """Write the fp32 logits of rows ``sl`` into ``out`` (``n x V``, fp32)."""
        h = self.rows[sl]
        if self.dtype == out.dtype:
            torch.mm(h, self.weight.t(), out=out)
        elif FP32_OUT_MATMUL and _fp32_out_mm(h, self.weight, out):
            pass  # half-precision inputs, fp32 accumulate AND fp32 result: no rounding of the logits
        elif tmp is not None and tmp.dtype == self.dtype:
            torch.mm(h, self.weight.t(), out=tmp[: out.shape[0]])
            out.copy_(tmp[: out.shape[0]])
        else:
            out.copy_(torch.mm(h, self.weight.t()))
        if self.bias is not None:
            out.add_(self.bias)
        return out


# ----------------------------------------------------------------------------- kernels
class Work:
    """A chunk's scratch: ``full`` buffers (rows x V, compute dtype), an optional ``small``
    one (a few rows x V) and, for half-precision heads, ``low`` (rows x V, matmul dtype)."""

    def __init__(self, full, small=None, low=None):
        self.full, self.small, self.low = full, small, low

    def view(self, n: int) -> "Work":
        return Work([b[:n] for b in self.full], self.small, None if self.low is None else self.low[:n])


class Kernel:
    """One kind of per-row statistic of the policy head against frozen heads.

    Subclasses set ``n_buffers`` (full chunk buffers), ``small_rows`` (rows of the small
    buffer, 0 for none), ``n_outputs`` (per-row statistics), ``n_grad`` (outputs that carry a
    gradient; they come first) and define :meth:`run`.
    """

    n_buffers = 1
    small_rows = 0
    n_outputs = 1
    n_grad = 1

    def run(self, work: Work, pol: Head, frozen, sl: slice, labels, extra: dict, grads, hint: bool = False):
        """Compute this chunk's statistics; return ``(stats, G)``.

        ``grads``: per-output upstream gradients of the chunk's rows, or None (then ``G`` is
        None); ``G`` is the logit gradient (one of the buffers). ``hint``: ``grads[0]`` is the
        caller's ``row_weight``, which stands for the gradient :meth:`assumed_grad` gives.
        """
        raise NotImplementedError

    def assumed_grad(self, row_weight: torch.Tensor, stats, extra: dict) -> torch.Tensor:
        """The upstream gradient of the first output that ``row_weight`` stands for."""
        return row_weight

    def backward_extra(self, extra: dict, outs) -> dict:
        """``extra`` for a recomputing backward, given the forward's outputs over all rows."""
        return extra

    def with_compile(self) -> "Kernel":
        """The variant whose element-wise chunk body runs under ``torch.compile`` (self if none)."""
        return self


_COMPILED: dict = {}


def compile_once(fn):
    """``torch.compile`` once per function (shapes vary with the last chunk: dynamic)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _work(kernel: Kernel, n: int, V: int, mm_dtypes, device, acc: torch.dtype) -> Work:
    full = [torch.empty(n, V, dtype=acc, device=device) for _ in range(kernel.n_buffers)]
    small = torch.empty(min(kernel.small_rows, n), V, dtype=acc, device=device) if kernel.small_rows else None
    low = [d for d in mm_dtypes if d != acc]
    return Work(full, small, torch.empty(n, V, dtype=low[0], device=device) if low else None)


def _chunks(kernel: Kernel, pol: Head, frozen, chunk_size):
    """``(slice, work view)`` per chunk of the policy's rows, over one set of buffers."""
    N, V = pol.rows.shape[0], pol.weight.shape[0]
    mm = [pol.dtype] + [f.dtype for f in frozen]
    c = _chunk_rows(chunk_size, kernel, V, N, any(d != pol.acc for d in mm), pol.rows.device.type)
    work = _work(kernel, c, V, mm, pol.rows.device, pol.acc)
    for start in range(0, N, c):
        sl = slice(start, min(start + c, N))
        yield sl, work.view(sl.stop - sl.start)


# ----------------------------------------------------------------------------- autograd
def _forward_rows(kernel, pol, frozen, labels, extra, chunk_size, row_weight=None, want=(False, False, False)):
    """Run ``kernel`` over all rows in chunks; with ``row_weight`` also compute the gradients
    for upstream gradient ``row_weight`` (on the first gradient-carrying output)."""
    N = pol.rows.shape[0]
    device = pol.rows.device
    outs = [torch.empty(0, device=device) for _ in range(kernel.n_outputs)] if N == 0 else None
    grad = _GradAccumulator(pol, want) if row_weight is not None else None
    hint = torch.empty(N, device=device, dtype=pol.acc) if row_weight is not None else None
    for sl, view in _chunks(kernel, pol, frozen, chunk_size):
        grads = None
        if grad is not None:
            w = row_weight[sl]
            grads = (w,) + tuple(torch.zeros_like(w) for _ in range(kernel.n_grad - 1))
        stats, G = kernel.run(view, pol, frozen, sl, labels, extra, grads, hint=grad is not None)
        if grad is not None:  # the gradient the forward assumed, for the backward's check
            hint[sl] = kernel.assumed_grad(w, stats, extra)
            grad.add(G, sl, view.low)
        if outs is None:
            outs = [torch.empty(N, dtype=s.dtype, device=device) for s in stats]
        for o, s in zip(outs, stats):
            o[sl] = s
    return outs, (grad, hint)


class _GradAccumulator:
    """Accumulates ``G @ W`` (rows), ``G^T @ h`` and ``G.sum(0)`` over chunks."""

    def __init__(self, pol: Head, want):
        self.pol = pol
        want_h, want_w, want_b = want
        N, d = pol.rows.shape
        V = pol.weight.shape[0]
        dev = pol.rows.device
        self.h = torch.zeros(N, d, dtype=pol.acc, device=dev) if want_h else None
        self.w = torch.zeros(V, d, dtype=pol.acc, device=dev) if want_w else None
        self.b = torch.zeros(V, dtype=pol.acc, device=dev) if want_b else None

    def add(self, G: torch.Tensor, sl: slice, low: torch.Tensor | None) -> None:
        pol = self.pol
        if pol.dtype != pol.acc:
            Gm = low[: G.shape[0]]
            Gm.copy_(G)
        else:
            Gm = G
        if self.h is not None:
            if pol.dtype == pol.acc:
                torch.mm(Gm, pol.weight, out=self.h[sl])
            else:
                self.h[sl] = torch.mm(Gm, pol.weight).to(pol.acc)
        if self.w is not None:
            if pol.dtype == pol.acc:
                self.w.addmm_(Gm.t(), pol.rows[sl])
            elif not fp32_out_addmm(self.w, Gm.t(), pol.rows[sl]):
                self.w.add_(torch.mm(Gm.t(), pol.rows[sl]).to(pol.acc))
        if self.b is not None:
            self.b.add_(G.sum(0))

    def scaled(self, c: float, dtypes):
        out = []
        for t, dt in zip((self.h, self.w, self.b), dtypes):
            out.append(None if t is None else t.mul_(c).to(dt))
        return out


class _FusedRows(torch.autograd.Function):
    """Per-row statistics of the policy head against frozen heads, with analytic backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, kernel, frozen, labels, extra, chunk_size, row_weight, want):
        pol = Head(hidden, weight, bias)
        outs, (grad, hint) = _forward_rows(kernel, pol, frozen, labels, extra, chunk_size, row_weight, want)
        ctx.kernel, ctx.frozen, ctx.chunk_size, ctx.want = kernel, frozen, chunk_size, want
        ctx.extra = kernel.backward_extra(extra, outs)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.grad = grad
        ctx.save_for_backward(hidden, weight, bias, labels, hint)
        ctx.mark_non_differentiable(*outs[kernel.n_grad:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        hidden, weight, bias, labels, row_weight = ctx.saved_tensors
        kernel = ctx.kernel
        acc = _acc_dtype(weight)
        gs = [torch.zeros(hidden.shape[0], device=hidden.device, dtype=acc) if g is None else g.to(acc)
              for g in grad_outs[: kernel.n_grad]]
        nones = (None,) * 7
        if ctx.grad is not None:
            c = _proportional(gs, row_weight)
            if c is not None:
                gh, gw, gb = ctx.grad.scaled(c, ctx.dtypes)
                ctx.grad = None
                STATS["rescaled"] += 1
                return (gh, gw, gb) + nones
        ctx.grad = None
        STATS["recomputed"] += 1
        pol = Head(hidden, weight, bias)
        acc = _GradAccumulator(pol, ctx.want)
        for sl, view in _chunks(kernel, pol, ctx.frozen, ctx.chunk_size):
            _, G = kernel.run(view, pol, ctx.frozen, sl, labels, ctx.extra, tuple(g[sl] for g in gs))
            acc.add(G, sl, view.low)
        gh, gw, gb = acc.scaled(1.0, ctx.dtypes)
        return (gh, gw, gb) + nones


def _proportional(gs: list[torch.Tensor], row_weight: torch.Tensor) -> float | None:
    """The constant ``c`` with ``gs[0] == c * row_weight`` (and no gradient on other outputs), or None."""
    if any(bool(g.any()) for g in gs[1:]):
        return None
    g = gs[0]
    w = row_weight.to(g.dtype)
    ww = float((w * w).sum())
    if ww == 0.0:
        return 0.0 if not bool(g.any()) else None
    c = float((g * w).sum()) / ww
    if torch.allclose(g, c * w, rtol=1e-5, atol=1e-30):
        return c
    return None


# ----------------------------------------------------------------------------- row plumbing
def _select(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx)


def _scatter(vals: torch.Tensor, idx: torch.Tensor, shape, fill: float = 0.0) -> torch.Tensor:
    out = vals.new_full((shape[0] * shape[1],), fill)
    return out.index_copy(0, idx, vals).reshape(shape)


def run_kernel(kernel: Kernel, policy: HeadRows, frozen: Sequence[HeadRows], groups, extra=None, *, chunk_size,
               row_weight=None, compile: bool = False):
    """Run ``kernel`` on the masked rows of one or more ``(labels, mask)`` groups at once.

    ``policy.hidden`` and every ``frozen[k].hidden`` are lists with one ``(B, T_g, d)``
    tensor per group (groups of ONE model share its head, so the head-weight gradient is
    accumulated once). ``extra``: kernel options; a list value holds one ``(B, T_g)`` tensor
    per group and becomes one tensor over the selected rows. ``row_weight``: one ``(B, T_g)``
    tensor per group, the forward-gradient shortcut (module docstring). Returns, per group,
    the kernel's outputs scattered to ``(B, T_g)`` (0 where the mask is 0).
    """
    check_chunk_size(chunk_size)
    if compile:
        kernel = kernel.with_compile()
    idxs = [_select(m) for _, m in groups]
    h = torch.cat([_rows(x, i) for x, i in zip(policy.hidden, idxs)])
    labels = torch.cat([_rows(lab, i) for (lab, _), i in zip(groups, idxs)])
    fro = tuple(Head(torch.cat([_rows(x.detach(), i) for x, i in zip(f.hidden, idxs)]), f.weight.detach(),
                     None if f.bias is None else f.bias.detach()) for f in frozen)
    acc = _acc_dtype(policy.weight)
    extra = {k: (torch.cat([_rows(a.detach().to(acc), i) for a, i in zip(v, idxs)]) if isinstance(v, list) else v)
             for k, v in (extra or {}).items()}
    rw = None if row_weight is None else torch.cat([_rows(w.detach().to(acc), i) for w, i in zip(row_weight, idxs)])
    W, b = policy.weight, policy.bias
    grad_on = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad or (b is not None and b.requires_grad))
    if grad_on:
        want = (h.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        outs = _FusedRows.apply(h, W, b, kernel, fro, labels, extra, chunk_size, rw, want)
    else:
        with torch.no_grad():
            outs, _ = _forward_rows(kernel, Head(h, W, b), fro, labels, extra, chunk_size)
    result, start = [], 0
    for (lab, m), i in zip(groups, idxs):
        n = i.numel()
        result.append([_scatter(o[start:start + n], i, m.shape) for o in outs])
        start += n
    return result
