"""Fused, chunked token-level losses: from final hidden states to loss without ``B x T x V``.

Every token-level loss in this package needs, at each response token, one or more
full-vocabulary distributions: the policy's (and its gradient), the reference's (TDPO,
SparsePO), or two teachers' (AlignDistil). Computed plainly, each is a ``(B, T, V)`` fp32
tensor; a step holds five or more of them. This module computes the same per-token
statistics from the final hidden states and the LM head weights, over chunks of
``chunk_size`` response rows at a time, and never allocates more than a few
``chunk_size x V`` buffers.

How it fits the rest of the package. The functions here produce PER-TOKEN statistics
(label log-probs, ``KL(p_ref || p_theta)``, ``KL(p_theta || pi*)``, ``alpha_t``) and hand
them to the same sequence-level functions the plain path uses
(:func:`~aligndistil.losses.tdpo.token_level_dpo_from_stats`,
:func:`~aligndistil.losses.sparsepo.sparsepo_loss_from_stats`,
:func:`~aligndistil.losses.aligndistil.aligndistil_loss_from_token_kl`, the DPO family on
label log-probs). The per-token statistics come out of a custom
:class:`torch.autograd.Function` whose backward multiplies each row's analytic gradient
with respect to the policy's logits by the upstream gradient that row receives, so masks,
sequence weights and learned mask parameters get their gradients from ordinary autograd.

The analytic gradients with respect to the policy's logits ``z`` (``p = softmax(z)``):

- label log-prob: ``d log p(y) / dz = onehot(y) - p``;
- forward KL (TDPO): ``d KL(p_ref || p) / dz = p - p_ref``;
- reverse KL (AlignDistil): ``d KL(p || q) / dz = p * (log p - log q - KL(p || q))``.

From a chunk's logit gradient ``G`` (rows x V) the hidden-state gradient is ``G @ W`` and
the head's is accumulated as ``G^T @ h`` (``G.sum(0)`` for a bias). Tied and untied
embeddings both work: the head weight is an ordinary input, and autograd adds its gradient
to the embedding when they are the same parameter.

Backward normally recomputes each chunk's logits (one extra matmul per head). When the
caller knows each row's upstream gradient up to one constant factor (AlignDistil: the loss
is linear in the per-token KL, with row weight ``beta_t / |y|``), it passes that as
``row_weight``; the forward then computes the gradients right away and the backward only
rescales them, after checking that the incoming gradient really is proportional to
``row_weight`` (if it is not, it recomputes, so the result is always exact).

:class:`HeadRows` stands in for the logits ``hidden @ W^T + b`` of one model: the fused
loss functions take ``HeadRows`` where their plain counterparts take logits, with the
same argument order, so a caller switches path by switching function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from aligndistil.losses.checks import check_mask, check_nonnegative, check_positive
from aligndistil.losses.aligndistil import aligndistil_loss_from_token_kl, token_weights
from aligndistil.losses.sparsepo import sparsepo_loss_from_stats
from aligndistil.losses.tdpo import token_level_dpo_from_stats

# Rows per chunk. "auto" picks them from a byte budget for the chunk's full-vocabulary fp32
# buffers, because what a chunk costs is rows x V: 256 rows are 50 MB per buffer at
# SmolLM2's V=49,152 but 156 MB at Qwen2.5's V=151,936. The budget trades memory for speed:
# each chunk re-reads every head's V x d weights, so fewer, larger chunks are faster
# (benchmarks/bench_loss.py; BENCHMARKS.md has the measured sweep).
DEFAULT_CHUNK_SIZE = "auto"
AUTO_CHUNK_BYTES = 128 * 2**20
AUTO_CHUNK_MULTIPLE, AUTO_CHUNK_MAX = 16, 4096

# How often a backward rescaled the forward's precomputed gradients vs. recomputed them
# (for tests and benchmarks; never read by the code).
STATS = {"rescaled": 0, "recomputed": 0}

__all__ = [
    "DEFAULT_CHUNK_SIZE", "HeadRows", "label_logps", "token_level_stats", "tdpo_loss", "sparsepo_loss",
    "aligndistil_token_stats", "aligndistil_loss", "check_chunk_size", "auto_chunk_rows", "fast_bf16_cpu",
]


# ----------------------------------------------------------------------------- inputs
@dataclass
class HeadRows:
    """The logits ``hidden @ weight^T + bias`` of one model, not yet computed.

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


def check_chunk_size(chunk_size) -> int | str:
    """A chunk size is a positive integer (rows per chunk) or ``"auto"``."""
    if chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or 'auto', got {chunk_size!r}")
    return chunk_size


def auto_chunk_rows(n_buffers: int, vocab_size: int, bytes_per_value: int = 4) -> int:
    """Rows whose ``n_buffers`` full ``rows x vocab_size`` buffers fit in :data:`AUTO_CHUNK_BYTES`,
    rounded down to a multiple of 16 and kept within ``[16, 4096]``.

    E.g. AlignDistil's kernel (3 fp32 buffers): 224 rows at V=49,152, 64 rows at V=151,936.
    """
    rows = AUTO_CHUNK_BYTES // max(1, n_buffers * vocab_size * bytes_per_value)
    rows = rows // AUTO_CHUNK_MULTIPLE * AUTO_CHUNK_MULTIPLE
    return int(min(AUTO_CHUNK_MAX, max(AUTO_CHUNK_MULTIPLE, rows)))


def _chunk_rows(chunk_size, kernel: "_Kernel", V: int, n_rows: int, low: bool) -> int:
    """The rows per chunk actually used (never more than there are rows)."""
    if chunk_size == "auto":
        chunk_size = auto_chunk_rows(kernel.n_buffers + (1 if low else 0), V)
    return min(chunk_size, max(n_rows, 1))


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


class _Head:
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
        elif tmp is not None and tmp.dtype == self.dtype:
            torch.mm(h, self.weight.t(), out=tmp[: out.shape[0]])
            out.copy_(tmp[: out.shape[0]])
        else:
            out.copy_(torch.mm(h, self.weight.t()))
        if self.bias is not None:
            out.add_(self.bias)
        return out


# ----------------------------------------------------------------------------- chunk kernels
def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` without an ``n x V`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor | None, tmp: torch.Tensor | None = None) -> None:
    """In place: ``x <- log_softmax(x)``; ``probs <- softmax(x)`` if given (else ``tmp`` is scratch)."""
    x.sub_(x.amax(-1, keepdim=True))
    e = probs if probs is not None else tmp
    torch.exp(x, out=e)
    s = e.sum(-1, keepdim=True)
    if probs is not None:
        probs.div_(s)
    x.sub_(s.log_())


def _softmax_into(x: torch.Tensor, out: torch.Tensor) -> None:
    torch.sub(x, x.amax(-1, keepdim=True), out=out)
    out.exp_()
    out.div_(out.sum(-1, keepdim=True))


class _Work:
    """A chunk's scratch: ``full`` buffers (rows x V, compute dtype), an optional ``small``
    one (a few rows x V) and, for half-precision heads, ``low`` (rows x V, matmul dtype)."""

    def __init__(self, full, small=None, low=None):
        self.full, self.small, self.low = full, small, low

    def view(self, n: int) -> "_Work":
        return _Work([b[:n] for b in self.full], self.small, None if self.low is None else self.low[:n])


class _Kernel:
    """One kind of per-row statistic. Subclasses define ``n_buffers`` (full chunk buffers),
    ``small_rows`` (rows of the small buffer, 0 for none), ``n_grad`` (outputs that carry a
    gradient; they come first) and ``run``."""

    n_buffers = 1
    small_rows = 0
    n_grad = 1

    def run(self, work: _Work, pol: "_Head", frozen, sl: slice, labels, extra, grads, over_alpha=False):
        """Compute this chunk's statistics. With ``grads`` (per-output upstream gradients for
        the chunk, or None), also return the logit gradient ``G`` (one of the buffers).
        ``over_alpha``: the first gradient is to be divided by the chunk's ``alpha_t``."""
        raise NotImplementedError

    def compiled(self) -> "_Kernel":
        """The variant whose element-wise body runs under ``torch.compile`` (self if none)."""
        return self


class _LabelLogp(_Kernel):
    """Policy label log-probs; gradient ``g * (onehot(y) - p)``."""

    n_buffers = 1
    n_grad = 1

    def run(self, work, pol, frozen, sl, labels, extra, grads, over_alpha=False):
        z = pol.logits_into(work.full[0], sl, work.low)
        y = labels[sl].unsqueeze(1)
        z.sub_(z.amax(-1, keepdim=True))
        picked = z.gather(1, y).squeeze(1)
        z.exp_()
        s = z.sum(-1)
        logp = picked - s.log()
        if grads is None:
            return (logp,), None
        (g,) = grads
        z.mul_((-g / s).unsqueeze(1))  # -g * p
        z.scatter_add_(1, y, g.unsqueeze(1))
        return (logp,), z


class _ForwardKL(_Kernel):
    """TDPO/SparsePO: policy label log-prob, ``KL(p_ref || p_theta)``, reference label log-prob.

    Gradient: ``g_kl * (p - p_ref) + g_lp * (onehot(y) - p)``.
    """

    n_buffers = 4
    n_grad = 2  # logp, kl (the reference's logp has none)

    def run(self, work, pol, frozen, sl, labels, extra, grads, over_alpha=False):
        G, R, PR, P = work.full
        (ref,) = frozen
        ref.logits_into(R, sl, work.low)
        _log_softmax_(R, PR)  # R = log p_ref, PR = p_ref
        pol.logits_into(G, sl, work.low)
        _log_softmax_(G, P)  # G = log p, P = p
        y = labels[sl].unsqueeze(1)
        logp = G.gather(1, y).squeeze(1)
        ref_logp = R.gather(1, y).squeeze(1)
        torch.sub(R, G, out=R)  # log p_ref - log p
        kl = _rowdot(PR, R)
        if grads is None:
            return (logp, kl, ref_logp), None
        g_lp, g_kl = grads
        # G <- p * (g_kl - g_lp) - g_kl * p_ref + g_lp * onehot(y)
        torch.mul(P, (g_kl - g_lp).unsqueeze(1), out=G)
        PR.mul_(g_kl.unsqueeze(1))
        G.sub_(PR)
        G.scatter_add_(1, y, g_lp.unsqueeze(1))
        return (logp, kl, ref_logp), G


class _ReverseKL(_Kernel):
    """AlignDistil: ``KL(p_theta || softmax(z*))`` with ``z* = z_b + alpha (z_b - z_n)``.

    ``alpha`` is a float, a per-row tensor (``extra["alpha"]``), or computed in the chunk
    as ``r * TVD(p_b, p_n) + eps`` (``extra["r"]``, ``extra["eps"]``). Outputs ``kl``
    (with gradient ``g * p * (log p - log q - kl)``), ``alpha`` and ``tvd`` (no gradient;
    ``tvd`` is NaN where it was not computed). Three full buffers and one small one.
    """

    n_buffers = 3
    small_rows = 8  # p_neg is softmaxed a few rows at a time: 8 x V, not another chunk buffer
    n_grad = 1

    def run(self, work, pol, frozen, sl, labels, extra, grads, over_alpha=False):
        A, Bn, P = work.full
        base, neg = frozen
        n = A.shape[0]
        base.logits_into(A, sl, work.low)
        neg.logits_into(Bn, sl, work.low)
        alpha = extra.get("alpha")
        if isinstance(alpha, torch.Tensor):
            alpha = alpha[sl]
        tvd = None
        if alpha is None:
            _softmax_into(A, P)  # p_base; p_neg a few rows at a time in the small buffer
            k = work.small.shape[0]
            for r in range(0, n, k):
                blk = slice(r, min(r + k, n))
                m = blk.stop - blk.start
                _softmax_into(Bn[blk], work.small[:m])
                P[blk].sub_(work.small[:m]).abs_()
            tvd = P.sum(-1).mul_(0.5)
            alpha = extra["r"] * tvd + extra["eps"]
        # Teacher logits z* = z_b + alpha * (z_b - z_n), written into A.
        torch.sub(A, Bn, out=Bn)
        if isinstance(alpha, torch.Tensor):
            Bn.mul_(alpha.unsqueeze(1))
        else:
            Bn.mul_(alpha)
        A.add_(Bn)
        _log_softmax_(A, None, Bn)  # A = log q
        pol.logits_into(Bn, sl, work.low)
        _log_softmax_(Bn, P)  # Bn = log p, P = p
        torch.sub(Bn, A, out=A)  # log p - log q
        kl = _rowdot(P, A)
        alpha_rows = alpha if isinstance(alpha, torch.Tensor) else torch.full((n,), float(alpha), dtype=kl.dtype, device=kl.device)
        tvd_rows = tvd if tvd is not None else torch.full((n,), float("nan"), dtype=kl.dtype, device=kl.device)
        if grads is None:
            return (kl, alpha_rows, tvd_rows), None
        g = grads[0] / alpha_rows if over_alpha else grads[0]
        A.sub_(kl.unsqueeze(1)).mul_(P).mul_(g.unsqueeze(1))
        return (kl, alpha_rows, tvd_rows), A

    def compiled(self):
        return _ReverseKLCompiled()


# ----------------------------------------------------------------------------- torch.compile
_COMPILED: dict = {}


def _compile(fn):
    """``torch.compile`` once per function (shapes vary with the last chunk: dynamic)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _rkl_body(zb, zn, z, alpha, w, out, r: float, eps: float, adaptive: bool, over_alpha: bool):
    """The element-wise part of :class:`_ReverseKL` as one pure function (for torch.compile)."""
    if adaptive:
        tvd = 0.5 * (torch.softmax(zb, -1) - torch.softmax(zn, -1)).abs().sum(-1)
        alpha = r * tvd + eps
    else:
        tvd = torch.full_like(alpha, float("nan"))
    zt = zb + alpha.unsqueeze(1) * (zb - zn)
    logq = zt - torch.logsumexp(zt, -1, keepdim=True)
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(logp)
    d = logp - logq
    kl = (p * d).sum(-1)
    if out is not None:
        g = w / alpha if over_alpha else w
        out.copy_(p * (d - kl.unsqueeze(1)) * g.unsqueeze(1))
    return kl, alpha, tvd


class _ReverseKLCompiled(_ReverseKL):
    """:class:`_ReverseKL` with its element-wise body fused by ``torch.compile``
    (reads the three logit buffers, writes only the gradient: four full buffers)."""

    n_buffers = 4
    small_rows = 0

    def run(self, work, pol, frozen, sl, labels, extra, grads, over_alpha=False):
        A, Bn, Z, Out = work.full
        base, neg = frozen
        n = A.shape[0]
        base.logits_into(A, sl, work.low)
        neg.logits_into(Bn, sl, work.low)
        pol.logits_into(Z, sl, work.low)
        alpha = extra.get("alpha")
        adaptive = alpha is None
        if isinstance(alpha, torch.Tensor):
            alpha = alpha[sl]
        elif alpha is None:
            alpha = torch.empty(n, dtype=A.dtype, device=A.device)
        else:
            alpha = torch.full((n,), float(alpha), dtype=A.dtype, device=A.device)
        w = grads[0] if grads is not None else None
        kl, alpha, tvd = _compile(_rkl_body)(A, Bn, Z, alpha, w, Out if grads is not None else None,
                                             float(extra.get("r", 0.0)), float(extra.get("eps", 0.0)), adaptive, over_alpha)
        return (kl, alpha, tvd), (Out if grads is not None else None)


def _work(kernel: _Kernel, n: int, V: int, mm_dtypes, device, acc: torch.dtype) -> _Work:
    full = [torch.empty(n, V, dtype=acc, device=device) for _ in range(kernel.n_buffers)]
    small = torch.empty(min(kernel.small_rows, n), V, dtype=acc, device=device) if kernel.small_rows else None
    low = [d for d in mm_dtypes if d != acc]
    return _Work(full, small, torch.empty(n, V, dtype=low[0], device=device) if low else None)


def _forward_rows(kernel, pol, frozen, labels, extra, chunk_size, row_weight=None, want=(False, False, False)):
    """Run ``kernel`` over all rows in chunks; with ``row_weight`` also compute the gradients
    for upstream gradient ``row_weight`` (on the first gradient-carrying output)."""
    N = pol.rows.shape[0]
    V = pol.weight.shape[0]
    device = pol.rows.device
    mm = [pol.dtype] + [f.dtype for f in frozen]
    c = _chunk_rows(chunk_size, kernel, V, N, any(d != pol.acc for d in mm))
    work = _work(kernel, c, V, mm, device, pol.acc)
    outs = None
    grad = _GradAccumulator(pol, want) if row_weight is not None else None
    hint = torch.empty(N, device=device, dtype=pol.acc) if row_weight is not None else None
    for start in range(0, N, c):
        sl = slice(start, min(start + c, N))
        view = work.view(sl.stop - sl.start)
        grads = None
        over_alpha = bool(extra.get("hint_over_alpha"))
        if grad is not None:
            w = row_weight[sl]
            grads = (w,) + tuple(torch.zeros_like(w) for _ in range(kernel.n_grad - 1))
        stats, G = kernel.run(view, pol, frozen, sl, labels, extra, grads, over_alpha)
        if grad is not None:  # the gradient the forward assumed, for the backward's check
            hint[sl] = w / stats[1] if over_alpha else w
        if outs is None:
            outs = [torch.empty(N, dtype=s.dtype, device=device) for s in stats]
        for o, s in zip(outs, stats):
            o[sl] = s
        if grad is not None:
            grad.add(G, sl, view.low)
    if outs is None:  # no rows
        outs = [torch.empty(0, device=device) for _ in range(3)]
    return outs, (grad, hint)


class _GradAccumulator:
    """Accumulates ``G @ W`` (rows), ``G^T @ h`` and ``G.sum(0)`` over chunks."""

    def __init__(self, pol: _Head, want):
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
            else:
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
        pol = _Head(hidden, weight, bias)
        outs, (grad, hint) = _forward_rows(kernel, pol, frozen, labels, extra, chunk_size, row_weight, want)
        ctx.kernel, ctx.frozen, ctx.extra, ctx.chunk_size, ctx.want = kernel, frozen, extra, chunk_size, want
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.grad = grad
        # alpha computed in the chunk is saved so that a recomputing backward reuses it exactly.
        if isinstance(kernel, _ReverseKL) and extra.get("alpha") is None:
            ctx.extra = {**extra, "alpha": outs[1]}
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
        pol = _Head(hidden, weight, bias)
        N = pol.rows.shape[0]
        V = pol.weight.shape[0]
        mm = [pol.dtype] + [f.dtype for f in ctx.frozen]
        c = _chunk_rows(ctx.chunk_size, kernel, V, N, any(d != pol.acc for d in mm))
        work = _work(kernel, c, V, mm, hidden.device, pol.acc)
        acc = _GradAccumulator(pol, ctx.want)
        for start in range(0, N, c):
            sl = slice(start, min(start + c, N))
            view = work.view(sl.stop - sl.start)
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


def _run(kernel, policy: HeadRows, frozen: Sequence[HeadRows], groups, extra=None, *, chunk_size, row_weight=None,
         compile: bool = False):
    """Run ``kernel`` on the masked rows of one or more ``(labels, mask)`` groups at once.

    ``policy.hidden`` and every ``frozen[k].hidden`` are lists with one ``(B, T_g, d)``
    tensor per group. Returns, per group, the kernel's outputs scattered to ``(B, T_g)``.
    """
    check_chunk_size(chunk_size)
    if compile:
        kernel = kernel.compiled()
    idxs = [_select(m) for _, m in groups]
    h = torch.cat([_rows(x, i) for x, i in zip(policy.hidden, idxs)])
    labels = torch.cat([_rows(lab, i) for (lab, _), i in zip(groups, idxs)])
    fro = tuple(_Head(torch.cat([_rows(x.detach(), i) for x, i in zip(f.hidden, idxs)]), f.weight.detach(),
                      None if f.bias is None else f.bias.detach()) for f in frozen)
    extra = dict(extra or {})
    acc = _acc_dtype(policy.weight)
    if isinstance(extra.get("alpha"), list):
        extra["alpha"] = torch.cat([_rows(a.detach().to(acc), i) for a, i in zip(extra["alpha"], idxs)])
    rw = None if row_weight is None else torch.cat([_rows(w.detach().to(acc), i) for w, i in zip(row_weight, idxs)])
    W, b = policy.weight, policy.bias
    grad_on = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad or (b is not None and b.requires_grad))
    if grad_on:
        want = (h.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        outs = _FusedRows.apply(h, W, b, kernel, fro, labels, extra, chunk_size, rw, want)
    else:
        with torch.no_grad():
            outs, _ = _forward_rows(kernel, _Head(h, W, b), fro, labels, extra, chunk_size)
    result, start = [], 0
    for (lab, m), i in zip(groups, idxs):
        n = i.numel()
        result.append([_scatter(o[start:start + n], i, m.shape) for o in outs])
        start += n
    return result


def _check_rows(name: str, z: HeadRows, labels: torch.Tensor, mask: torch.Tensor, vocab: int | None = None) -> None:
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


def _same_rows(name: str, z: HeadRows, like: HeadRows) -> None:
    if z.hidden.shape[:2] != like.hidden.shape[:2]:
        raise ValueError(f"{name} has {tuple(z.hidden.shape[:2])} rows, expected {tuple(like.hidden.shape[:2])}")


# ----------------------------------------------------------------------------- public functions
def label_logps(z: HeadRows, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False) -> torch.Tensor:
    """Fused :func:`aligndistil.model.outputs.label_logps`: ``(B, T)`` log-probabilities of ``labels``.

    Only rows where ``mask`` is nonzero are computed (0 elsewhere); without a mask every row is.
    Differentiable with respect to ``z.hidden``, ``z.weight`` and ``z.bias``.
    """
    if mask is None:
        mask = torch.ones(labels.shape, device=labels.device)
    _check_rows("z", z, labels, mask)
    (res,) = _run(_LabelLogp(), HeadRows([z.hidden], z.weight, z.bias), (), [(labels, mask)], chunk_size=chunk_size,
                  compile=compile)
    return res[0]


def label_logps_group(zs: Sequence[HeadRows], labels: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *,
                      chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False) -> list[torch.Tensor]:
    """:func:`label_logps` of several row groups of ONE model (e.g. chosen and rejected) in one
    pass, so that the head-weight gradient is accumulated once, not once per group."""
    if not zs:
        return []
    for k, (z, y, m) in enumerate(zip(zs, labels, masks)):
        _check_rows(f"zs[{k}]", z, y, m)
        if z.weight is not zs[0].weight or z.bias is not zs[0].bias:
            raise ValueError("label_logps_group: every group must use the same head (the same weight tensor)")
    res = _run(_LabelLogp(), HeadRows([z.hidden for z in zs], zs[0].weight, zs[0].bias), (),
               list(zip(labels, masks)), chunk_size=chunk_size, compile=compile)
    return [r[0] for r in res]


def token_level_stats(
    policy_chosen: HeadRows, policy_rejected: HeadRows, reference_chosen: HeadRows, reference_rejected: HeadRows,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
    *, chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Fused :func:`aligndistil.losses.tdpo.pair_token_stats`: policy and reference label
    log-probs and ``KL(p_ref || p_theta)`` per token for both responses, each ``(B, T)``.

    The policy's two heads must be the same weights (one model), as must the reference's.
    """
    check_chunk_size(chunk_size)
    _check_rows("policy_chosen", policy_chosen, chosen_labels, chosen_mask)
    V = policy_chosen.weight.shape[0]
    _check_rows("policy_rejected", policy_rejected, rejected_labels, rejected_mask, V)
    _check_rows("reference_chosen", reference_chosen, chosen_labels, chosen_mask, V)
    _check_rows("reference_rejected", reference_rejected, rejected_labels, rejected_mask, V)
    if policy_chosen.hidden.shape[0] != policy_rejected.hidden.shape[0]:
        raise ValueError("policy_chosen and policy_rejected have different batch sizes")
    if policy_rejected.weight is not policy_chosen.weight or reference_rejected.weight is not reference_chosen.weight:
        raise ValueError("chosen and rejected rows must come from the same heads (same weight tensors)")
    pol = HeadRows([policy_chosen.hidden, policy_rejected.hidden], policy_chosen.weight, policy_chosen.bias)
    ref = HeadRows([reference_chosen.hidden, reference_rejected.hidden], reference_chosen.weight, reference_chosen.bias)
    (lc, klc, rc), (lr, klr, rr) = _run(_ForwardKL(), pol, (ref,), [(chosen_labels, chosen_mask), (rejected_labels, rejected_mask)],
                                        chunk_size=chunk_size, compile=compile)
    return lc, lr, rc.detach(), rr.detach(), klc, klr


def tdpo_loss(
    policy_chosen: HeadRows, policy_rejected: HeadRows, reference_chosen: HeadRows, reference_rejected: HeadRows,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
    *, variant: int, beta: float = 0.1, alpha: float = 0.5, chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Fused :func:`aligndistil.losses.tdpo_loss` (same arguments, :class:`HeadRows` for logits)."""
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2 (TDPO1 or TDPO2), got {variant!r}")
    check_positive("beta", beta)
    check_nonnegative("alpha", alpha)
    stats = token_level_stats(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                              chosen_labels, rejected_labels, chosen_mask, rejected_mask, chunk_size=chunk_size,
                              compile=compile)
    return token_level_dpo_from_stats(*stats, chosen_mask, rejected_mask, beta=beta,
                                      alpha=1.0 if variant == 1 else alpha, stop_grad_chosen_kl=(variant == 2))


def sparsepo_loss(
    policy_chosen: HeadRows, policy_rejected: HeadRows, reference_chosen: HeadRows, reference_rejected: HeadRows,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
    chosen_reward_mask: torch.Tensor, rejected_reward_mask: torch.Tensor,
    chosen_kl_mask: torch.Tensor, rejected_kl_mask: torch.Tensor,
    *, beta: float = 0.1, lambda_u: float = 0.0, lambda_d: float = 0.0, chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    compile: bool = False,
):
    """Fused :func:`aligndistil.losses.sparsepo_loss` (same arguments, :class:`HeadRows` for logits)."""
    check_positive("beta", beta)
    check_nonnegative("lambda_u", lambda_u)
    check_nonnegative("lambda_d", lambda_d)
    for name, m, ref in (("chosen_reward_mask", chosen_reward_mask, chosen_mask),
                         ("rejected_reward_mask", rejected_reward_mask, rejected_mask),
                         ("chosen_kl_mask", chosen_kl_mask, chosen_mask),
                         ("rejected_kl_mask", rejected_kl_mask, rejected_mask)):
        if m.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(m.detach()).all() or bool((m.detach() < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
    stats = token_level_stats(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                              chosen_labels, rejected_labels, chosen_mask, rejected_mask, chunk_size=chunk_size,
                              compile=compile)
    return sparsepo_loss_from_stats(*stats, chosen_mask, rejected_mask, chosen_reward_mask, rejected_reward_mask,
                                    chosen_kl_mask, rejected_kl_mask, beta=beta, lambda_u=lambda_u, lambda_d=lambda_d)


def aligndistil_token_stats(
    policy: HeadRows, base: HeadRows, negative: HeadRows, labels: torch.Tensor, mask: torch.Tensor, *,
    alpha: float | torch.Tensor | None = None, r: float | None = None, eps: float = 1e-3,
    row_weight: torch.Tensor | None = None, row_weight_over_alpha: bool = False,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Per-token ``KL(pi_theta || softmax(z*))`` with ``z* = z_base + alpha (z_base - z_neg)``.

    Args:
        policy, base, negative: :class:`HeadRows` of the policy, the DPO model and the
            negative model (reverse DPO, or the reference for the vanilla teacher).
        labels, mask: ``(B, T)`` (labels are only range-checked: the loss needs no label).
        alpha: a float, a ``(B, T)`` tensor ``alpha_t``, or None for the adaptive teacher,
            computed in each chunk as ``r * TVD(pi_dpo, pi_neg) + eps``.
        row_weight: ``(B, T)`` the gradient each token's KL is expected to receive, up to
            one constant factor (``beta_t * mask / |y|`` for AlignDistil); lets the forward
            compute the gradients at once (see the module docstring). Optional.
        row_weight_over_alpha: the expected gradient is ``row_weight / alpha_t`` (the
            adaptive teacher's ``beta_t = beta0 / alpha_t``, known only inside the chunk).

    Returns:
        ``kl (B, T)`` (differentiable), ``alpha (B, T)`` and ``tvd (B, T)`` (detached; tvd
        only for the adaptive teacher, else None). Padding rows hold 0 (alpha: 1).
    """
    check_chunk_size(chunk_size)
    _check_rows("policy", policy, labels, mask)
    V = policy.weight.shape[0]
    for name, z in (("base", base), ("negative", negative)):
        z.check(name)
        _same_rows(name, z, policy)
        if z.weight.shape[0] != V:
            raise ValueError(f"{name} has a vocabulary of {z.weight.shape[0]} but the policy has {V}")
    extra: dict = {}
    if alpha is None:
        if r is None:
            raise ValueError("pass alpha, or r (and eps) for the adaptive teacher")
        check_nonnegative("r", r)
        check_positive("eps", eps)
        extra.update(r=float(r), eps=float(eps))
    elif isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
        if alpha.shape != mask.shape:
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected {tuple(mask.shape)} or a scalar")
        if not torch.isfinite(alpha).all():
            raise ValueError("alpha must be finite")
        extra["alpha"] = [alpha]
    else:
        a = float(alpha)
        if a != a or a in (float("inf"), float("-inf")):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        extra["alpha"] = a
    if row_weight_over_alpha:
        extra["hint_over_alpha"] = True
    pol = HeadRows([policy.hidden], policy.weight, policy.bias)
    fro = (HeadRows([base.hidden], base.weight, base.bias), HeadRows([negative.hidden], negative.weight, negative.bias))
    (res,) = _run(_ReverseKL(), pol, fro, [(labels, mask)], extra, chunk_size=chunk_size,
                  row_weight=None if row_weight is None else [row_weight], compile=compile)
    kl, a, tvd = res
    a = torch.where(mask > 0, a, torch.ones_like(a))
    return kl, a.detach(), (tvd.detach() if alpha is None else None)


def aligndistil_loss(
    policy: HeadRows, base: HeadRows, negative: HeadRows, labels: torch.Tensor, mask: torch.Tensor, *,
    alpha: float | torch.Tensor | None = None, r: float | None = None, eps: float = 1e-3,
    beta0: float = 0.1, weighting: str = "beta_t", beta: float | None = None,
    tvd: torch.Tensor | None = None, chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Fused AlignDistil loss (Eq. 18/19), the composite teacher built inside each chunk.

    Equals the plain composition: ``alpha_t = adaptive_alpha(z_base, z_neg, r=r, eps=eps)``
    when ``alpha`` is None, ``z* = aligndistil_teacher_logits(z_base, z_neg, alpha)``, then
    :func:`aligndistil.losses.aligndistil_loss` with that ``alpha`` (or with ``beta``, the
    vanilla teacher's constant weight, in which case ``alpha`` must be given).

    ``tvd``: ``(B, T)`` precomputed ``TVD(pi_dpo, pi_neg)`` (the teacher cache's); with
    ``alpha`` None, ``alpha_t = r * tvd + eps`` instead of computing the TVD in the chunks.

    Returns ``(losses (B,), metrics)`` as the plain loss; the adaptive teacher adds ``tvd/mean``.
    """
    from aligndistil.losses.aligndistil import WEIGHTINGS

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    check_positive("beta0", beta0)
    if beta is not None:
        check_positive("beta", beta)
        if alpha is None:
            raise ValueError("the vanilla teacher (beta given) needs its alpha = beta0/beta - 1")
    lengths = mask.sum(-1, keepdim=True)
    given_tvd = tvd
    if alpha is None and tvd is not None:
        check_nonnegative("r", r)
        check_positive("eps", eps)
        if tvd.shape != mask.shape:
            raise ValueError(f"tvd has shape {tuple(tvd.shape)}, expected {tuple(mask.shape)}")
        alpha = r * tvd.detach().to(mask.dtype) + eps
    adaptive_weights = alpha is None and weighting == "beta_t"
    if adaptive_weights:
        # beta_t = beta0 / alpha_t: alpha_t is computed in the chunk, the row weight follows it.
        row_weight = beta0 * mask / lengths
    else:
        known = token_weights(alpha if alpha is not None else 1.0, beta0, weighting, mask, beta=beta)
        row_weight = known * mask / lengths
    kl, a, tvd = aligndistil_token_stats(policy, base, negative, labels, mask, alpha=alpha, r=r, eps=eps,
                                         row_weight=row_weight, row_weight_over_alpha=adaptive_weights,
                                         chunk_size=chunk_size, compile=compile)
    if alpha is None:
        alpha = a
    if given_tvd is not None:
        tvd = given_tvd
    weights = token_weights(alpha, beta0, weighting, mask, beta=beta)
    report_alpha = beta0 / beta if beta is not None else alpha
    losses, metrics = aligndistil_loss_from_token_kl(kl, mask, weights, report_alpha)
    if tvd is not None:
        metrics["tvd/mean"] = (tvd * mask).sum(-1) / mask.sum(-1)
    return losses, metrics


@torch.no_grad()
def teacher_tvd(base: HeadRows, negative: HeadRows, mask: torch.Tensor, *,
                chunk_size: int | str = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``TVD(softmax(z_base), softmax(z_neg)) = 1/2 sum_v |p_b - p_n|`` per token, ``(B, T)``.

    Chunked over the rows where ``mask`` is nonzero (0 elsewhere), never ``B x T x V``;
    what the teacher cache stores so that ``alpha_t = r * TVD + eps`` needs no teacher.
    """
    check_chunk_size(chunk_size)
    for name, z in (("base", base), ("negative", negative)):
        z.check(name)
    _same_rows("negative", negative, base)
    if base.weight.shape[0] != negative.weight.shape[0]:
        raise ValueError("base and negative heads have different vocabularies")
    check_mask("mask", mask, base.hidden.shape[:2])
    idx = _select(mask)
    b = _Head(_rows(base.hidden, idx), base.weight, base.bias)
    n = _Head(_rows(negative.hidden, idx), negative.weight, negative.bias)
    N, V = b.rows.shape[0], b.weight.shape[0]
    out = torch.empty(N, dtype=b.acc, device=b.rows.device)
    c = min(auto_chunk_rows(2, V) if chunk_size == "auto" else chunk_size, max(N, 1))
    A = torch.empty(c, V, dtype=b.acc, device=b.rows.device)
    P = torch.empty_like(A)
    for start in range(0, N, c):
        sl = slice(start, min(start + c, N))
        k = sl.stop - sl.start
        b.logits_into(A[:k], sl, None)
        _softmax_into(A[:k], P[:k])
        n.logits_into(A[:k], sl, None)
        _softmax_into(A[:k], A[:k])
        P[:k].sub_(A[:k]).abs_()
        out[sl] = P[:k].sum(-1).mul_(0.5)
    return _scatter(out, idx, mask.shape)
