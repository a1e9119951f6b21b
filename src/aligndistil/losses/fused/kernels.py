"""Per-statistic kernels of the fused path and the fused statistics producers built on them.

Each kernel computes, for one chunk of response rows, what :mod:`aligndistil.losses.ops`
computes on full logits, plus the analytic gradient with respect to the policy's logits
``z`` (``p = softmax(z)``):

========================  =================================================  ==========================================
kernel                    statistics (``ops`` formula)                       gradient of the first output(s)
========================  =================================================  ==========================================
:class:`LabelLogp`        ``log p(y)`` (``label_logps``)                     ``onehot(y) - p``
:class:`ForwardKL`        ``log p(y)``, ``KL(p_ref || p)`` (``token_kl``),   ``p - p_ref`` for the KL
                          ``log p_ref(y)``
:class:`ReverseKL`        ``KL(p || softmax(z*))`` with the teacher          ``p * (log p - log q - KL(p || q))``
                          ``z* = z_b + alpha (z_b - z_n)`` (``teacher_logits``),
                          ``alpha``, ``TVD(p_b, p_n)`` (``token_tvd``)
:class:`TeacherTVD`       ``TVD(p_b, p_n)`` (``token_tvd``), no gradient     --
========================  =================================================  ==========================================

Memory is the point of the fused path, so the chunk bodies work IN PLACE on the engine's
``rows x V`` buffers: the small helpers below (:func:`_label_logp_`, :func:`_kl_`,
:func:`_tvd_`, the eager branch of :func:`_teacher_log_probs_`) restate the ``ops`` formula
they name without allocating another ``rows x V`` tensor. The adaptive ``alpha_t`` is always
:func:`aligndistil.losses.ops.alpha_from_tvd`. The reverse-KL chunk is ONE implementation
(:meth:`ReverseKL.run`); ``train.compile_loss`` runs its two element-wise halves under
``torch.compile``, where they call the ``ops`` formulas themselves (see the comment above
:func:`_teacher_log_probs_` for why the two forms).

The producers (:func:`label_logps`, :func:`label_logps_group`, :func:`token_level_stats`,
:func:`aligndistil_token_stats`, :func:`teacher_tvd`) return what their plain counterparts
return (:func:`aligndistil.losses.ops.label_logps`,
:func:`aligndistil.losses.tdpo.pair_token_stats`,
:func:`aligndistil.losses.aligndistil.aligndistil_token_stats`,
:func:`aligndistil.losses.ops.token_tvd`), with :class:`~.engine.HeadRows` for logits; the
losses are then composed by the same ``*_from_stats`` functions on both paths.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aligndistil.losses import ops
from aligndistil.losses.aligndistil import resolve_alpha
from aligndistil.losses.checks import check_mask
from aligndistil.losses.fused.engine import (
    DEFAULT_CHUNK_SIZE,
    HeadRows,
    Kernel,
    check_chunk_size,
    check_rows,
    check_same_rows,
    compile_once,
    run_kernel,
)


# ----------------------------------------------------------------------------- in-place chunk arithmetic
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


def _label_logp_(z: torch.Tensor, y: torch.Tensor):
    """:func:`~aligndistil.losses.ops.label_logps` in place: ``(log p(y), s)`` with ``z <- exp(z - max)``
    (the unnormalised probabilities, kept for the gradient) and ``s`` their row sums."""
    z.sub_(z.amax(-1, keepdim=True))
    picked = z.gather(1, y).squeeze(1)
    z.exp_()
    s = z.sum(-1)
    return picked - s.log(), s


def _kl_(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`~aligndistil.losses.ops.token_kl` from log-probabilities: ``KL(p || q)`` per row,
    leaving ``log p - log q`` in ``out`` (which may be ``logp`` or ``logq``)."""
    torch.sub(logp, logq, out=out)
    return _rowdot(p, out)


def _tvd_(P: torch.Tensor, zn: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """:func:`~aligndistil.losses.ops.token_tvd` in place: on entry ``P = softmax(z_b)``; returns
    ``1/2 sum_v |P - softmax(zn)|`` per row (``P`` is overwritten, ``zn`` kept). ``softmax(zn)``
    is taken a few rows at a time in ``small`` instead of in another ``n x V`` buffer."""
    n, k = P.shape[0], small.shape[0]
    for r in range(0, n, k):
        blk = slice(r, min(r + k, n))
        m = blk.stop - blk.start
        _softmax_into(zn[blk], small[:m])
        P[blk].sub_(small[:m]).abs_()
    return P.sum(-1).mul_(0.5)


# The reverse-KL chunk's two element-wise halves (the policy's matmul runs between them).
# Compiled (train.compile_loss), each half is the ops formulas themselves: inductor fuses them
# into a few passes and writes only the output buffer. Eager, the same formulas run in place,
# because every out-of-place step would allocate another n x V tensor. (Compiling the in-place
# form instead makes inductor keep 4 n x V temporaries: measured on an H200 at 224 x 49,152.)
def _teacher_log_probs_(A, Bn, P, small, alpha, r: float, eps: float):
    """First half: ``A <- log softmax(z*)``, ``z* = z_b + alpha (z_b - z_n)``.

    On entry ``A = z_b``, ``Bn = z_n``; ``Bn`` and ``P`` are scratch afterwards. ``alpha``:
    ``(n,)``, or None for the adaptive teacher (``alpha_t = r * TVD_t + eps``). Returns
    ``(alpha, tvd)`` (``tvd`` None unless adaptive).
    """
    tvd = None
    if torch.compiler.is_compiling():
        if alpha is None:
            tvd = ops.token_tvd(A, Bn)
            alpha = ops.alpha_from_tvd(tvd, r, eps)
        A.copy_(torch.log_softmax(ops.teacher_logits(A, Bn, alpha), -1))
        return alpha, tvd
    if alpha is None:
        _softmax_into(A, P)
        tvd = _tvd_(P, Bn, small)
        alpha = ops.alpha_from_tvd(tvd, r, eps)
    # ops.teacher_logits, written into A with Bn as scratch: no fourth n x V buffer.
    torch.sub(A, Bn, out=Bn)
    Bn.mul_(alpha.unsqueeze(1))
    A.add_(Bn)
    _log_softmax_(A, None, Bn)
    return alpha, tvd


def _reverse_kl_(logq, Z, P, g):
    """Second half: ``KL(p || q)`` per row (:func:`~aligndistil.losses.ops.token_kl` from
    ``log q``) from ``logq`` (A) and the policy's logits ``Z``.

    With ``g`` (upstream gradient per row) ``logq`` ends holding the logit gradient
    ``g * p * (log p - log q - KL)``; eager, ``Z <- log p`` and ``P <- p`` on the way.
    """
    if torch.compiler.is_compiling():
        logp = torch.log_softmax(Z, -1)
        p = logp.exp()
        d = logp - logq
        kl = (p * d).sum(-1)
        if g is not None:
            logq.copy_(p * (d - kl.unsqueeze(1)) * g.unsqueeze(1))
        return kl
    _log_softmax_(Z, P)
    kl = _kl_(P, Z, logq, out=logq)
    if g is not None:
        logq.sub_(kl.unsqueeze(1)).mul_(P).mul_(g.unsqueeze(1))
    return kl


# ----------------------------------------------------------------------------- kernels
class LabelLogp(Kernel):
    """Policy label log-probs; gradient ``g * (onehot(y) - p)``."""

    n_buffers = 1

    def run(self, work, pol, frozen, sl, labels, extra, grads, hint=False):
        z = pol.logits_into(work.full[0], sl, work.low)
        y = labels[sl].unsqueeze(1)
        logp, s = _label_logp_(z, y)
        if grads is None:
            return (logp,), None
        (g,) = grads
        z.mul_((-g / s).unsqueeze(1))  # -g * p
        z.scatter_add_(1, y, g.unsqueeze(1))
        return (logp,), z


class ForwardKL(Kernel):
    """TDPO/SparsePO: policy label log-prob, ``KL(p_ref || p_theta)``, reference label log-prob.

    Gradient: ``g_kl * (p - p_ref) + g_lp * (onehot(y) - p)``.
    """

    n_buffers = 4
    n_outputs = 3
    n_grad = 2  # logp, kl (the reference's logp has none)

    def run(self, work, pol, frozen, sl, labels, extra, grads, hint=False):
        G, R, PR, P = work.full
        (ref,) = frozen
        ref.logits_into(R, sl, work.low)
        _log_softmax_(R, PR)  # R = log p_ref, PR = p_ref
        pol.logits_into(G, sl, work.low)
        _log_softmax_(G, P)  # G = log p, P = p
        y = labels[sl].unsqueeze(1)
        logp = G.gather(1, y).squeeze(1)
        ref_logp = R.gather(1, y).squeeze(1)
        kl = _kl_(PR, R, G, out=R)
        if grads is None:
            return (logp, kl, ref_logp), None
        g_lp, g_kl = grads
        # G <- p * (g_kl - g_lp) - g_kl * p_ref + g_lp * onehot(y)
        torch.mul(P, (g_kl - g_lp).unsqueeze(1), out=G)
        PR.mul_(g_kl.unsqueeze(1))
        G.sub_(PR)
        G.scatter_add_(1, y, g_lp.unsqueeze(1))
        return (logp, kl, ref_logp), G


class ReverseKL(Kernel):
    """AlignDistil: ``KL(p_theta || softmax(z*))`` with ``z* = z_b + alpha (z_b - z_n)``.

    ``extra["alpha"]``: a float or a per-row tensor; absent for the adaptive teacher, whose
    ``alpha_t = r * TVD(p_b, p_n) + eps`` is computed in the chunk (``extra["r"]``,
    ``extra["eps"]``). Outputs ``kl`` (with gradient), ``alpha`` and ``tvd`` (no gradient;
    ``tvd`` is NaN where it was not computed). Three full buffers and, uncompiled, one small one.
    ``extra["row_weight_over_alpha"]``: the row weight is to be divided by the chunk's ``alpha_t``.
    """

    n_buffers = 3
    small_rows = 8  # p_neg is softmaxed a few rows at a time: 8 x V, not another chunk buffer
    n_outputs = 3

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        if compiled:
            self.small_rows = 0

    def with_compile(self):
        return ReverseKL(compiled=True)

    def _body(self, fn):
        return compile_once(fn) if self.compiled else fn

    def assumed_grad(self, row_weight, stats, extra):
        return row_weight / stats[1] if extra.get("row_weight_over_alpha") else row_weight

    def backward_extra(self, extra, outs):
        # alpha computed in the chunks is saved so that a recomputing backward reuses it exactly.
        return {**extra, "alpha": outs[1]} if extra.get("alpha") is None else extra

    def run(self, work, pol, frozen, sl, labels, extra, grads, hint=False):
        A, Bn, P = work.full
        base, neg = frozen
        n = A.shape[0]
        base.logits_into(A, sl, work.low)
        neg.logits_into(Bn, sl, work.low)
        alpha = extra.get("alpha")
        if isinstance(alpha, torch.Tensor):
            alpha = alpha[sl]
        elif alpha is not None:
            alpha = torch.full((n,), float(alpha), dtype=A.dtype, device=A.device)
        alpha, tvd = self._body(_teacher_log_probs_)(A, Bn, P, work.small, alpha, extra.get("r"), extra.get("eps"))
        pol.logits_into(Bn, sl, work.low)
        g = None
        if grads is not None:
            g = self.assumed_grad(grads[0], (None, alpha), extra) if hint else grads[0]
        kl = self._body(_reverse_kl_)(A, Bn, P, g)
        if tvd is None:
            tvd = torch.full((n,), float("nan"), dtype=kl.dtype, device=kl.device)
        return (kl, alpha, tvd), (A if g is not None else None)


class TeacherTVD(Kernel):
    """``TVD(softmax(z_b), softmax(z_n))`` per row, the "policy" head being ``z_b``; no gradient."""

    n_buffers = 2
    small_rows = 8

    def run(self, work, pol, frozen, sl, labels, extra, grads, hint=False):
        A, P = work.full
        (neg,) = frozen
        pol.logits_into(A, sl, work.low)
        _softmax_into(A, P)
        neg.logits_into(A, sl, work.low)
        return (_tvd_(P, A, work.small),), None


# ----------------------------------------------------------------------------- producers
def label_logps(z: HeadRows, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False) -> torch.Tensor:
    """Fused :func:`aligndistil.losses.ops.label_logps`: ``(B, T)`` log-probabilities of ``labels``.

    Only rows where ``mask`` is nonzero are computed (0 elsewhere); without a mask every row is.
    Differentiable with respect to ``z.hidden``, ``z.weight`` and ``z.bias``.
    """
    if mask is None:
        mask = torch.ones(labels.shape, device=labels.device)
    check_rows("z", z, labels, mask)
    (res,) = run_kernel(LabelLogp(), HeadRows([z.hidden], z.weight, z.bias), (), [(labels, mask)],
                        chunk_size=chunk_size, compile=compile)
    return res[0]


def label_logps_group(zs: Sequence[HeadRows], labels: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *,
                      chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False) -> list[torch.Tensor]:
    """:func:`label_logps` of several row groups of ONE model (e.g. chosen and rejected) in one
    pass, so that the head-weight gradient is accumulated once, not once per group."""
    if not zs:
        return []
    for k, (z, y, m) in enumerate(zip(zs, labels, masks)):
        check_rows(f"zs[{k}]", z, y, m)
        if z.weight is not zs[0].weight or z.bias is not zs[0].bias:
            raise ValueError("label_logps_group: every group must use the same head (the same weight tensor)")
    res = run_kernel(LabelLogp(), HeadRows([z.hidden for z in zs], zs[0].weight, zs[0].bias), (),
                     list(zip(labels, masks)), chunk_size=chunk_size, compile=compile)
    return [r[0] for r in res]


def token_level_stats(
    policy_chosen: HeadRows, policy_rejected: HeadRows, reference_chosen: HeadRows, reference_rejected: HeadRows,
    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
    *, chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Fused :func:`aligndistil.losses.tdpo.pair_token_stats`: policy and reference label
    log-probs and ``KL(p_ref || p_theta)`` per token for both responses, each ``(B, T)``, in
    the order :func:`aligndistil.losses.tdpo.token_level_dpo_from_stats` takes them.

    The policy's two heads must be the same weights (one model), as must the reference's.
    """
    check_chunk_size(chunk_size)
    check_rows("policy_chosen", policy_chosen, chosen_labels, chosen_mask)
    V = policy_chosen.weight.shape[0]
    check_rows("policy_rejected", policy_rejected, rejected_labels, rejected_mask, V)
    check_rows("reference_chosen", reference_chosen, chosen_labels, chosen_mask, V)
    check_rows("reference_rejected", reference_rejected, rejected_labels, rejected_mask, V)
    if policy_chosen.hidden.shape[0] != policy_rejected.hidden.shape[0]:
        raise ValueError("policy_chosen and policy_rejected have different batch sizes")
    if policy_rejected.weight is not policy_chosen.weight or reference_rejected.weight is not reference_chosen.weight:
        raise ValueError("chosen and rejected rows must come from the same heads (same weight tensors)")
    pol = HeadRows([policy_chosen.hidden, policy_rejected.hidden], policy_chosen.weight, policy_chosen.bias)
    ref = HeadRows([reference_chosen.hidden, reference_rejected.hidden], reference_chosen.weight, reference_chosen.bias)
    groups = [(chosen_labels, chosen_mask), (rejected_labels, rejected_mask)]
    (lc, klc, rc), (lr, klr, rr) = run_kernel(ForwardKL(), pol, (ref,), groups, chunk_size=chunk_size, compile=compile)
    return lc, lr, rc.detach(), rr.detach(), klc, klr


def aligndistil_token_stats(
    policy: HeadRows, base: HeadRows, negative: HeadRows, mask: torch.Tensor, *,
    alpha: float | torch.Tensor | None = None, r: float | None = None, eps: float = 1e-3,
    tvd: torch.Tensor | None = None, row_weight: torch.Tensor | None = None, row_weight_over_alpha: bool = False,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE, compile: bool = False,
):
    """Fused :func:`aligndistil.losses.aligndistil.aligndistil_token_stats`: per-token
    ``KL(pi_theta || softmax(z*))``, ``z* = z_base + alpha (z_base - z_neg)`` built in each chunk.

    Args:
        policy, base, negative: :class:`HeadRows` of the policy, the DPO model and the
            negative model (reverse DPO, or the reference for the vanilla teacher).
        mask: ``(B, T)`` response mask.
        alpha, r, eps, tvd: the teacher's ``alpha`` as in the plain producer (None: adaptive,
            ``r * TVD + eps``, the TVD computed in each chunk unless ``tvd`` is given).
        row_weight: ``(B, T)`` the gradient each token's KL is expected to receive, up to
            one constant factor (:func:`aligndistil.losses.aligndistil.kl_row_weight`); lets
            the forward compute the gradients at once (:mod:`.engine`). Optional.
        row_weight_over_alpha: the expected gradient is ``row_weight / alpha_t`` (the
            adaptive teacher's ``beta_t = beta0 / alpha_t``, known only inside the chunk).

    Returns:
        ``kl (B, T)`` (differentiable), ``alpha`` (as given, else ``(B, T)`` with 1 on
        padding) and ``tvd (B, T)`` for the adaptive teacher (else None), both detached.
    """
    check_chunk_size(chunk_size)
    labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)  # the loss reads no label
    check_rows("policy", policy, labels, mask)
    V = policy.weight.shape[0]
    for name, z in (("base", base), ("negative", negative)):
        z.check(name)
        check_same_rows(name, z, policy)
        if z.weight.shape[0] != V:
            raise ValueError(f"{name} has a vocabulary of {z.weight.shape[0]} but the policy has {V}")
    adaptive = alpha is None
    alpha = resolve_alpha(alpha, r=r, eps=eps, tvd=tvd, mask=mask)
    if alpha is None:
        extra: dict = {"r": float(r), "eps": float(eps)}
    else:
        extra = {"alpha": [alpha] if isinstance(alpha, torch.Tensor) else float(alpha)}
    if row_weight_over_alpha:
        extra["row_weight_over_alpha"] = True
    pol = HeadRows([policy.hidden], policy.weight, policy.bias)
    fro = (HeadRows([base.hidden], base.weight, base.bias), HeadRows([negative.hidden], negative.weight, negative.bias))
    (res,) = run_kernel(ReverseKL(), pol, fro, [(labels, mask)], extra, chunk_size=chunk_size,
                        row_weight=None if row_weight is None else [row_weight], compile=compile)
    kl, a, chunk_tvd = res
    if alpha is None:
        alpha = torch.where(mask > 0, a, torch.ones_like(a)).detach()
        tvd = chunk_tvd
    return kl, alpha, (tvd.detach() if adaptive else None)


@torch.no_grad()
def teacher_tvd(base: HeadRows, negative: HeadRows, mask: torch.Tensor, *,
                chunk_size: int | str = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Fused :func:`aligndistil.losses.ops.token_tvd` of two teachers: ``1/2 sum_v |p_b - p_n|``, ``(B, T)``.

    Over the rows where ``mask`` is nonzero (0 elsewhere), never ``B x T x V``; what the
    teacher cache stores so that ``alpha_t = r * TVD + eps`` needs no teacher.
    """
    check_chunk_size(chunk_size)
    for name, z in (("base", base), ("negative", negative)):
        z.check(name)
    check_same_rows("negative", negative, base)
    if base.weight.shape[0] != negative.weight.shape[0]:
        raise ValueError("base and negative heads have different vocabularies")
    check_mask("mask", mask, base.hidden.shape[:2])
    labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    (res,) = run_kernel(TeacherTVD(), HeadRows([base.hidden], base.weight, base.bias),
                        (HeadRows([negative.hidden], negative.weight, negative.bias),), [(labels, mask)],
                        chunk_size=chunk_size)
    return res[0]
