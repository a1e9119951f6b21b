"""TDPO1 / TDPO2 (docs/math.md, "TDPO") against hand values, a naive implementation and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

import _spec_naive as naive
from aligndistil.losses.ops import label_logps
from aligndistil.losses import tdpo_loss

F64 = torch.float64
L2, L3 = math.log(2.0), math.log(3.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_pair():
    """B = 1, V = 2; chosen has 2 tokens, rejected 1 token + 1 padding row.

    chosen  t0: policy [0, log 3] -> (1/4, 3/4), label 1 ; ref [0, 0] -> (1/2, 1/2)
    chosen  t1: policy [log 2, 0] -> (2/3, 1/3), label 0 ; ref [0, 0] -> (1/2, 1/2)
    rejected t0: policy [0, 0] -> (1/2, 1/2), label 0 ; ref [log 3, 0] -> (3/4, 1/4)
    rejected t1: padding (mask 0) with large garbage logits that must not matter.
    """
    pc = torch.tensor([[[0.0, L3], [L2, 0.0]]], dtype=F64, requires_grad=True)
    rc = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    pr = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]], dtype=F64, requires_grad=True)
    rr = torch.tensor([[[L3, 0.0], [-5.0, 5.0]]], dtype=F64)
    lc = torch.tensor([[1, 0]])
    lr = torch.tensor([[0, 1]])
    mc = torch.tensor([[1.0, 1.0]], dtype=F64)
    mr = torch.tensor([[1.0, 0.0]], dtype=F64)
    return pc, pr, rc, rr, lc, lr, mc, mr


def hand_terms(beta):
    """u and delta of :func:`hand_pair`, by hand."""
    # token log-ratios log pi_theta/pi_ref (y_t):
    r_w0 = math.log(3 / 4) - math.log(1 / 2)   # = log(3/2)
    r_w1 = math.log(2 / 3) - math.log(1 / 2)   # = log(4/3)
    r_l0 = math.log(1 / 2) - math.log(3 / 4)   # = log(2/3)
    u = beta * (r_w0 + r_w1) - beta * r_l0
    # forward KL(ref || theta) per token, sum_v ref(v) (log ref(v) - log theta(v)):
    kl_w0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_w1 = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    kl_l0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    seqkl_w = kl_w0 + kl_w1
    seqkl_l = kl_l0
    delta = beta * seqkl_l - beta * seqkl_w
    return u, delta, seqkl_w, seqkl_l


def test_tdpo1_hand_value():
    beta = 0.5
    u, delta, seqkl_w, seqkl_l = hand_terms(beta)
    # u = 0.5 (log 3/2 + log 4/3) - 0.5 log 2/3 = 0.5 log 2 + 0.5 log 3/2 ~ 0.5493
    assert u == pytest.approx(0.5 * L2 + 0.5 * math.log(1.5), abs=1e-15)
    expected = -math.log(sig(u - delta))
    losses, m = tdpo_loss(*hand_pair(), variant=1, beta=beta)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert m["kl/chosen"].item() == pytest.approx(seqkl_w, abs=1e-12)
    assert m["kl/rejected"].item() == pytest.approx(seqkl_l, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (math.log(1.5) + math.log(4 / 3)), abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(beta * math.log(2 / 3), abs=1e-12)


def test_tdpo2_hand_value():
    beta, alpha = 0.5, 0.5
    u, delta, _, _ = hand_terms(beta)
    # TDPO2: -log sigma(u - alpha * delta2); the value of delta2 equals delta (sg only cuts gradient)
    expected = -math.log(sig(u - alpha * delta))
    losses, _ = tdpo_loss(*hand_pair(), variant=2, beta=beta, alpha=alpha)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # and with alpha = 1 TDPO2 has TDPO1's value
    l2, _ = tdpo_loss(*hand_pair(), variant=2, beta=beta, alpha=1.0)
    assert l2.item() == pytest.approx(-math.log(sig(u - delta)), abs=1e-12)


def test_tdpo1_ignores_alpha():
    a, _ = tdpo_loss(*hand_pair(), variant=1, beta=0.5, alpha=0.5)
    b, _ = tdpo_loss(*hand_pair(), variant=1, beta=0.5, alpha=0.1)
    assert torch.equal(a, b)


def test_variant_is_required():
    with pytest.raises(TypeError):
        tdpo_loss(*hand_pair())


# ------------------------------------------------------------------ random data + naive

B, T, V = 2, 3, 3


def random_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    pr = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    rc = torch.randn(B, T, V, generator=g, dtype=F64)
    rr = torch.randn(B, T, V, generator=g, dtype=F64)
    lc = torch.randint(0, V, (B, T), generator=g)
    lr = torch.randint(0, V, (B, T), generator=g)
    mc = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    mr = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=F64)
    return pc, pr, rc, rr, lc, lr, mc, mr


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_matches_naive_value_and_grad(variant):
    args = random_pair(seed=7)
    pc, pr = args[0], args[1]
    got, _ = tdpo_loss(*args, variant=variant, beta=0.3, alpha=0.6)
    want = naive.token_level_dpo(*args, beta=0.3, alpha=1.0 if variant == 1 else 0.6,
                                 stop_grad_chosen_kl=(variant == 2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (pc, pr)), torch.autograd.grad(want.sum(), (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tdpo1_gradcheck():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=8)
    assert torch.autograd.gradcheck(
        lambda x, y: tdpo_loss(x, y, rc, rr, lc, lr, mc, mr, variant=1, beta=0.3)[0], (pc, pr)
    )


def test_tdpo2_gradcheck():
    """Finite differences cannot see a stop-gradient: w.r.t. the CHOSEN logits TDPO2's
    analytic gradient deliberately differs from the numerical one (that is the point of
    sg). So gradcheck runs w.r.t. the rejected logits, and checks that it FAILS w.r.t. the
    chosen ones; the chosen gradient is checked exactly by the two tests below."""
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=8)
    assert torch.autograd.gradcheck(
        lambda y: tdpo_loss(pc, y, rc, rr, lc, lr, mc, mr, variant=2, beta=0.3, alpha=0.6)[0], (pr,)
    )
    assert not torch.autograd.gradcheck(
        lambda x: tdpo_loss(x, pr, rc, rr, lc, lr, mc, mr, variant=2, beta=0.3, alpha=0.6)[0], (pc,),
        raise_exception=False,
    )


def test_tdpo2_no_gradient_through_chosen_seqkl():
    """dL/dz_w of TDPO2 = -(1 - sigma(m)) * beta * d/dz_w sum_t log pi_theta(y_w,t): only u depends on z_w.

    With L_b = -log sigma(m_b), sigma(m_b) = exp(-L_b). TDPO1's chosen gradient also has
    the chosen-KL term, so the same identity must FAIL for TDPO1 (the check can fail).
    """
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=9)
    beta = 0.3
    seq_w = (label_logps(pc, lc) * mc).sum(-1)  # (B,) log pi_theta(y_w|x)
    # d seq_w[b] / d pc, row by row (rows are independent, so one grad of the sum suffices)
    g_seq = torch.autograd.grad(seq_w.sum(), pc)[0]

    def predicted_and_actual(variant):
        losses, _ = tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=variant, beta=beta, alpha=0.5)
        g = torch.autograd.grad(losses.sum(), pc)[0]
        factor = -(1.0 - torch.exp(-losses.detach())) * beta
        return factor[:, None, None] * g_seq, g

    pred2, act2 = predicted_and_actual(2)
    torch.testing.assert_close(act2, pred2, rtol=1e-10, atol=1e-12)
    pred1, act1 = predicted_and_actual(1)
    assert (act1 - pred1).abs().max() > 1e-3

    # Also: the gradient w.r.t. the REJECTED logits still carries the rejected KL term,
    # i.e. it differs from the one of a loss without any KL.
    losses2, _ = tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=2, beta=beta, alpha=0.5)
    g_r = torch.autograd.grad(losses2.sum(), pr)[0]
    seq_l = (label_logps(pr, lr) * mr).sum(-1)
    g_seq_l = torch.autograd.grad(seq_l.sum(), pr)[0]
    no_kl = ((1.0 - torch.exp(-losses2.detach())) * beta)[:, None, None] * g_seq_l
    assert (g_r - no_kl).abs().max() > 1e-3


def test_tdpo2_chosen_grad_equals_hand_detached_naive():
    args = random_pair(seed=10)
    pc = args[0]
    got, _ = tdpo_loss(*args, variant=2, beta=0.4, alpha=0.5)
    detached = naive.token_level_dpo(*args, beta=0.4, alpha=0.5, stop_grad_chosen_kl=True)
    not_detached = naive.token_level_dpo(*args, beta=0.4, alpha=0.5, stop_grad_chosen_kl=False)
    g = torch.autograd.grad(got.sum(), pc)[0]
    g_det = torch.autograd.grad(detached.sum(), pc)[0]
    g_nodet = torch.autograd.grad(not_detached.sum(), pc)[0]
    torch.testing.assert_close(g, g_det, rtol=1e-10, atol=1e-12)
    assert (g - g_nodet).abs().max() > 1e-3


def test_reference_gets_no_gradient():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=11)
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    losses, _ = tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=1)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None and pr.grad is not None


def test_seqkl_is_forward_kl_reference_first():
    # KL(ref || theta) != KL(theta || ref) on the hand pair: the metric must be the forward one.
    pc, pr, rc, rr, lc, lr, mc, mr = hand_pair()
    _, m = tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=1, beta=0.5)
    # reverse KL of chosen t0: 1/4 log(1/4 / 1/2) + 3/4 log(3/4 / 1/2)
    rev_w0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    fwd_w0 = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
    assert abs(rev_w0 - fwd_w0) > 1e-2
    _, _, seqkl_w, _ = hand_terms(0.5)
    assert m["kl/chosen"].item() == pytest.approx(seqkl_w, abs=1e-12)


# ------------------------------------------------------------------------------- bad input


def test_bad_variant():
    for v in (0, 3, "2"):
        with pytest.raises(ValueError, match="variant"):
            tdpo_loss(*hand_pair(), variant=v)


@pytest.mark.parametrize("beta", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        tdpo_loss(*hand_pair(), variant=1, beta=beta)


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        tdpo_loss(*hand_pair(), variant=2, alpha=-0.5)


def test_bad_shapes():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair()
    with pytest.raises(ValueError, match="reference_chosen_logits"):
        tdpo_loss(pc, pr, rc[..., :2], rr, lc, lr, mc, mr, variant=1)
    with pytest.raises(ValueError, match="chosen_mask"):
        tdpo_loss(pc, pr, rc, rr, lc, lr, mc[:, :2], mr, variant=1)
    with pytest.raises(ValueError, match="policy_rejected_logits"):
        tdpo_loss(pc, pr[0], rc, rr, lc, lr, mc, mr, variant=1)
    with pytest.raises(ValueError, match="chosen_labels"):
        tdpo_loss(pc, pr, rc, rr, lc[:, :2], lr, mc, mr, variant=1)
    with pytest.raises(ValueError, match="rejected_labels"):
        tdpo_loss(pc, pr, rc, rr, lc, lr + V, mc, mr, variant=1)
    with pytest.raises(ValueError, match="policy_chosen_logits has batch size 2 but policy_rejected_logits"):
        tdpo_loss(pc, pr[:1], rc, rr[:1], lc, lr[:1], mc, mr[:1], variant=1)


def test_empty_mask_row():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair()
    mr = mr.clone()
    mr[1] = 0
    with pytest.raises(ValueError, match="rejected_mask"):
        tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits(bad):
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair()
    pr = pr.detach().clone()
    pr[0, 0, 1] = bad
    with pytest.raises(ValueError, match="policy_rejected_logits"):
        tdpo_loss(pc, pr, rc, rr, lc, lr, mc, mr, variant=1)
    rc = rc.clone()
    rc[1, 2, 0] = bad
    with pytest.raises(ValueError, match="reference_chosen_logits"):
        tdpo_loss(pc, pr.nan_to_num(), rc, rr, lc, lr, mc, mr, variant=1)
