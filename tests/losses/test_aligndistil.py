"""AlignDistil teachers, adaptive alpha and the distillation loss (docs/math.md, "AlignDistil")."""

from __future__ import annotations

import math

import pytest
import torch

import _spec_naive as naive
from aligndistil.losses.ops import token_tvd
from aligndistil.losses import (
    adaptive_alpha,
    aligndistil_loss,
    aligndistil_loss_from_stats,
    aligndistil_teacher_logits,
    aligndistil_token_stats,
    contrastive_alpha,
    kl_row_weight,
    vanilla_alpha,
)

F64 = torch.float64
L3 = math.log(3.0)
E = math.e


def t(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------------- teachers

Z_DPO = [[[1.0, 0.0, 0.0]]]
Z_REF = [[[0.0, 0.0, 1.0]]]
Z_REV = [[[0.0, 1.0, 0.0]]]


def test_vanilla_teacher_hand_value_extrapolating():
    # beta0 = 0.1, beta = 0.05: beta0/beta = 2, alpha = 2 - 1 = 1
    a = vanilla_alpha(0.1, 0.05)
    assert a == pytest.approx(1.0, abs=1e-15)
    z = aligndistil_teacher_logits(t(Z_DPO), t(Z_REF), a)
    # (beta0/beta) z_dpo + (1 - beta0/beta) z_ref = 2 (1, 0, 0) - (0, 0, 1) = (2, 0, -1)
    torch.testing.assert_close(z, t([[[2.0, 0.0, -1.0]]]), rtol=0, atol=1e-15)


def test_vanilla_teacher_hand_value_interpolating():
    # beta0 = 0.1, beta = 0.4: c = 0.25 -> 0.25 (1, 0, 0) + 0.75 (0, 0, 1) = (0.25, 0, 0.75)
    a = vanilla_alpha(0.1, 0.4)
    assert a == pytest.approx(-0.75, abs=1e-15)
    z = aligndistil_teacher_logits(t(Z_DPO), t(Z_REF), a)
    torch.testing.assert_close(z, t([[[0.25, 0.0, 0.75]]]), rtol=0, atol=1e-15)


def test_contrastive_teacher_hand_value():
    # alpha = beta0/beta = 0.1/0.05 = 2: z_dpo + 2 (z_dpo - z_rev) = (1,0,0) + 2 (1,-1,0) = (3, -2, 0)
    a = contrastive_alpha(0.1, 0.05)
    assert a == pytest.approx(2.0, abs=1e-15)
    z = aligndistil_teacher_logits(t(Z_DPO), t(Z_REV), a)
    torch.testing.assert_close(z, t([[[3.0, -2.0, 0.0]]]), rtol=0, atol=1e-15)


def test_adaptive_teacher_hand_value():
    # token 0: dpo (1, 0, 0), rev (0, 1, 0):
    #   pi_dpo = (e, 1, 1)/(e + 2), pi_rev = (1, e, 1)/(e + 2)
    #   TVD = 1/2 (|e - 1| + |1 - e| + 0)/(e + 2) = (e - 1)/(e + 2)
    #   alpha = r TVD + eps = 10 (e - 1)/(e + 2) + 0.001 ~ 3.6430
    # token 1: dpo = rev = (0, 2, 0): TVD = 0, alpha = eps = 0.001, teacher = dpo
    dpo = t([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    rev = t([[[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]])
    alpha = adaptive_alpha(dpo, rev, r=10.0)
    a0 = 10.0 * (E - 1.0) / (E + 2.0) + 1e-3
    assert alpha.shape == (1, 2)
    assert alpha[0, 0].item() == pytest.approx(a0, abs=1e-6)
    assert alpha[0, 1].item() == 1e-3
    z = aligndistil_teacher_logits(dpo, rev, alpha)
    # z* = dpo + alpha (dpo - rev): token 0 = (1 + a0, -a0, 0); token 1 = (0, 2, 0)
    torch.testing.assert_close(z, t([[[1.0 + a0, -a0, 0.0], [0.0, 2.0, 0.0]]]), rtol=0, atol=1e-5)


def test_teacher_carries_no_gradient():
    dpo = t(Z_DPO).requires_grad_(True)
    z = aligndistil_teacher_logits(dpo, t(Z_REV), 2.0)
    assert not z.requires_grad


def test_teachers_match_naive():
    g = torch.Generator().manual_seed(0)
    dpo, ref, rev = (torch.randn(2, 3, 4, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(aligndistil_teacher_logits(dpo, ref, vanilla_alpha(0.1, 0.03)),
                               naive.teacher(dpo, ref, 0.1 / 0.03 - 1.0), rtol=1e-14, atol=1e-14)
    # vanilla written as AlignDistil Eq. 11 writes it: (beta0/beta) z_dpo + (1 - beta0/beta) z_ref
    c = 0.1 / 0.03
    torch.testing.assert_close(aligndistil_teacher_logits(dpo, ref, vanilla_alpha(0.1, 0.03)),
                               c * dpo + (1 - c) * ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(aligndistil_teacher_logits(dpo, rev, contrastive_alpha(0.1, 0.03)),
                               naive.teacher(dpo, rev, 0.1 / 0.03), rtol=1e-14, atol=1e-14)
    alpha = adaptive_alpha(dpo, rev, r=15.0)
    for b in range(2):
        for s in range(3):
            assert alpha[b, s].item() == pytest.approx(15.0 * naive.tvd(dpo[b, s], rev[b, s]) + 1e-3, abs=1e-5)
    torch.testing.assert_close(aligndistil_teacher_logits(dpo, rev, alpha), naive.teacher(dpo, rev, alpha),
                               rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------ adaptive alpha


def test_tvd_uses_the_half():
    # (3/4, 1/4) vs (1/2, 1/2): 1/2 (1/4 + 1/4) = 1/4 (without the 1/2 it would be 1/2)
    assert token_tvd(t([L3, 0.0]), t([0.0, 0.0])).item() == pytest.approx(0.25, abs=1e-15)
    # disjoint distributions: TVD = 1, not 2
    assert token_tvd(t([50.0, 0.0]), t([0.0, 50.0])).item() == pytest.approx(1.0, abs=1e-12)
    # and through adaptive_alpha: r = 2 -> 2 * 1/4 + eps = 0.501
    assert adaptive_alpha(t([[[L3, 0.0]]]), t([[[0.0, 0.0]]]), r=2.0).item() == pytest.approx(0.501, abs=1e-6)


@pytest.mark.parametrize("r", [0.0, 1.0, 10.0, 20.0])
def test_adaptive_alpha_range(r):
    eps = 1e-3
    g = torch.Generator().manual_seed(int(r))
    dpo = torch.randn(4, 5, 7, generator=g, dtype=F64) * 3
    rev = torch.randn(4, 5, 7, generator=g, dtype=F64) * 3
    a = adaptive_alpha(dpo, rev, r=r, eps=eps)
    assert a.shape == (4, 5)
    assert (a >= eps).all() and (a <= r + eps).all()
    # identical logits -> exactly eps
    same = adaptive_alpha(dpo, dpo.clone(), r=r, eps=eps)
    assert torch.equal(same, torch.full_like(same, eps))
    # disjoint one-hot-like distributions -> r + eps (TVD ~ 1 - 2 e^-50)
    hot_a = torch.full((2, 3, 4), -50.0, dtype=F64)
    hot_b = hot_a.clone()
    hot_a[..., 0] = 50.0
    hot_b[..., 1] = 50.0
    far = adaptive_alpha(hot_a, hot_b, r=r, eps=eps)
    torch.testing.assert_close(far, torch.full_like(far, r + eps), rtol=0, atol=1e-5)


def test_adaptive_alpha_is_detached():
    dpo = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    assert not adaptive_alpha(dpo, torch.randn(1, 2, 3, dtype=F64), r=10.0).requires_grad


# --------------------------------------------------------------------------------- loss


def hand_batch():
    """B = 2, T = 2, V = 2.

    row 0, t0: policy (1/2, 1/2)  teacher (3/4, 1/4)   alpha 0.5
    row 0, t1: policy (3/4, 1/4)  teacher (1/2, 1/2)   alpha 2.0
    row 1, t0: policy (1/4, 3/4)  teacher (1/2, 1/2)   alpha 1.0
    row 1, t1: padding (mask 0): garbage logits and a tiny alpha that must not matter
    """
    policy = t([[[0.0, 0.0], [L3, 0.0]], [[0.0, L3], [9.0, -9.0]]]).requires_grad_(True)
    teacher = t([[[L3, 0.0], [0.0, 0.0]], [[0.0, 0.0], [-9.0, 9.0]]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    alpha = t([[0.5, 2.0], [1.0, 1e-9]])
    return policy, teacher, mask, alpha


# reverse KL(policy || teacher) = sum_v p(v) (log p(v) - log q(v)), by hand:
KL00 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
KL01 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
KL10 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)


def test_aligndistil_loss_beta_t_hand_value():
    policy, teacher, mask, alpha = hand_batch()
    losses, m = aligndistil_loss(policy, teacher, mask, alpha=alpha, beta0=0.1, weighting="beta_t")
    # beta_t = beta0 / alpha_t: row 0 -> (0.1/0.5, 0.1/2) = (0.2, 0.05) ; row 1 -> 0.1/1 = 0.1
    # each sequence divided by its own length |y|: 2 and 1
    expected0 = (0.2 * KL00 + 0.05 * KL01) / 2
    expected1 = (0.1 * KL10) / 1
    assert losses.tolist() == pytest.approx([expected0, expected1], abs=1e-12)
    assert m["teacher_kl"].tolist() == pytest.approx([(KL00 + KL01) / 2, KL10], abs=1e-12)
    assert m["alpha/mean"].tolist() == pytest.approx([(0.5 + 2.0) / 2, 1.0], abs=1e-12)
    assert m["response_length"].tolist() == [2.0, 1.0]


def test_aligndistil_loss_uniform_hand_value():
    policy, teacher, mask, alpha = hand_batch()
    losses, _ = aligndistil_loss(policy, teacher, mask, alpha=alpha, beta0=0.1, weighting="uniform")
    # every token weight 1
    assert losses.tolist() == pytest.approx([(KL00 + KL01) / 2, KL10], abs=1e-12)


def test_aligndistil_loss_scalar_alpha_hand_value():
    policy, teacher, mask, _ = hand_batch()
    # contrastive teacher: alpha = beta0/beta = 2 -> beta_t = beta = 0.05 on every token
    losses, m = aligndistil_loss(policy, teacher, mask, alpha=2.0, beta0=0.1)
    assert losses.tolist() == pytest.approx([0.05 * (KL00 + KL01) / 2, 0.05 * KL10], abs=1e-12)
    assert m["alpha/mean"].tolist() == [2.0, 2.0]


def test_aligndistil_loss_is_reverse_kl():
    # forward KL(teacher || policy) of row 1 t0 differs from the reverse one used
    fwd10 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(fwd10 - KL10) > 1e-2
    policy, teacher, mask, _ = hand_batch()
    losses, _ = aligndistil_loss(policy, teacher, mask, alpha=1.0, beta0=1.0)
    assert losses[1].item() == pytest.approx(KL10, abs=1e-12)


def test_teacher_gets_no_gradient_in_loss():
    policy, teacher, mask, alpha = hand_batch()
    teacher.requires_grad_(True)
    losses, _ = aligndistil_loss(policy, teacher, mask, alpha=alpha)
    losses.sum().backward()
    assert teacher.grad is None
    assert policy.grad is not None
    assert (policy.grad[1, 1] == 0).all()  # padding row gets no gradient


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 2, 3, 3
    policy = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    dpo = torch.randn(B, T, V, generator=g, dtype=F64)
    rev = torch.randn(B, T, V, generator=g, dtype=F64)
    mask = t([[1, 1, 1], [1, 1, 0]])
    return policy, dpo, rev, mask


@pytest.mark.parametrize("weighting", ["beta_t", "uniform"])
def test_aligndistil_loss_matches_naive_value_and_grad(weighting):
    policy, dpo, rev, mask = random_batch(seed=1)
    alpha = adaptive_alpha(dpo, rev, r=10.0)
    teacher = aligndistil_teacher_logits(dpo, rev, alpha)
    got, _ = aligndistil_loss(policy, teacher, mask, alpha=alpha, beta0=0.1, weighting=weighting)
    want = naive.aligndistil(policy, naive.teacher(dpo, rev, alpha), mask, alpha=alpha, beta0=0.1,
                             weighting=weighting)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), policy)[0], torch.autograd.grad(want.sum(), policy)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting", ["beta_t", "uniform"])
def test_aligndistil_loss_gradcheck(weighting):
    policy, dpo, rev, mask = random_batch(seed=2)
    alpha = adaptive_alpha(dpo, rev, r=10.0)
    teacher = aligndistil_teacher_logits(dpo, rev, alpha)
    assert torch.autograd.gradcheck(
        lambda x: aligndistil_loss(x, teacher, mask, alpha=alpha, beta0=0.1, weighting=weighting)[0], (policy,)
    )


def test_vanilla_gradcheck_scalar_alpha():
    policy, dpo, ref, mask = random_batch(seed=3)
    teacher = aligndistil_teacher_logits(dpo, ref, vanilla_alpha(0.1, 0.05))
    f = lambda x: aligndistil_loss(x, teacher, mask, alpha=0.1 / 0.05, beta0=0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (policy,))
    want = naive.aligndistil(policy, teacher, mask, alpha=2.0, beta0=0.1)
    torch.testing.assert_close(f(policy), want, rtol=1e-12, atol=1e-12)


def test_kl_row_weight_is_the_gradient_of_the_composition():
    """d losses_b / d kl_bt = beta_t mask_bt / |y_b| (the fused backward's shortcut), by hand on
    hand_batch: beta_t = 0.1 / alpha_t, |y| = (2, 1)."""
    _, _, mask, alpha = hand_batch()
    kl = torch.rand(2, 2, dtype=F64, requires_grad=True)
    cases = [
        # (arguments, expected row weight, divided by alpha_t in the chunk)
        ({"alpha": alpha}, [[0.2 / 2, 0.05 / 2], [0.1, 0.0]], False),
        ({"alpha": alpha, "weighting": "uniform"}, [[0.5, 0.5], [1.0, 0.0]], False),
        ({"alpha": 1.0, "beta": 0.05}, [[0.025, 0.025], [0.05, 0.0]], False),  # vanilla: beta on every token
        ({}, [[0.1 / 2, 0.1 / 2], [0.1, 0.0]], True),  # adaptive: beta0 mask / |y|, then / alpha_t
    ]
    for kw, want, over in cases:
        hint = kl_row_weight(mask, beta0=0.1, **kw)
        assert hint["row_weight_over_alpha"] is over
        torch.testing.assert_close(hint["row_weight"], t(want), rtol=0, atol=1e-15)
        if not over:
            losses, _ = aligndistil_loss_from_stats(kl, mask, beta0=0.1, **kw)
            torch.testing.assert_close(torch.autograd.grad(losses.sum(), kl)[0], t(want), rtol=0, atol=1e-15)


def test_plain_producer_is_teacher_then_reverse_kl():
    """aligndistil_token_stats = token KL to aligndistil_teacher_logits; adaptive: alpha from the
    teachers' TVD, or from a given TVD (the teacher cache's), which from_stats reports as tvd/mean."""
    policy, dpo, rev, mask = random_batch(seed=4)
    alpha = adaptive_alpha(dpo, rev, r=10.0)
    kl, a, tvd = aligndistil_token_stats(policy, dpo, rev, mask, r=10.0)
    torch.testing.assert_close(a, alpha, rtol=0, atol=0)
    torch.testing.assert_close(tvd, (alpha - 1e-3) / 10.0, rtol=1e-12, atol=1e-12)
    want, _ = aligndistil_loss(policy, aligndistil_teacher_logits(dpo, rev, alpha), mask, alpha=alpha)
    got, metrics = aligndistil_loss_from_stats(kl, mask, alpha=a, tvd=tvd)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert metrics["tvd/mean"].tolist() == pytest.approx(((tvd * mask).sum(-1) / mask.sum(-1)).tolist(), abs=1e-15)
    given = torch.full_like(tvd, 0.25)
    kl2, a2, tvd2 = aligndistil_token_stats(policy, dpo, rev, mask, r=10.0, tvd=given)
    assert torch.equal(tvd2, given)
    torch.testing.assert_close(a2, torch.full_like(given, 2.501), rtol=0, atol=1e-15)  # 10 * 0.25 + 0.001
    kl3, a3, tvd3 = aligndistil_token_stats(policy, dpo, rev, mask, alpha=2.501)
    assert tvd3 is None and a3 == 2.501
    torch.testing.assert_close(kl2, kl3, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------- bad input


def test_bad_r_and_eps():
    dpo, rev = t(Z_DPO), t(Z_REV)
    with pytest.raises(ValueError, match=r"^r must"):
        adaptive_alpha(dpo, rev, r=-1.0)
    with pytest.raises(ValueError, match=r"^r must"):
        adaptive_alpha(dpo, rev, r=float("nan"))
    with pytest.raises(ValueError, match=r"^eps must"):
        adaptive_alpha(dpo, rev, r=10.0, eps=0.0)
    with pytest.raises(ValueError, match="dpo_logits"):
        adaptive_alpha(dpo, t([[[0.0, 1.0]]]), r=10.0)
    bad = dpo.clone()
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="reverse_dpo_logits"):
        adaptive_alpha(dpo, bad, r=10.0)


@pytest.mark.parametrize("beta", [0.0, -0.05, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=r"^beta must"):
        vanilla_alpha(0.1, beta)
    with pytest.raises(ValueError, match=r"^beta must"):
        contrastive_alpha(0.1, beta)
    with pytest.raises(ValueError, match=r"^beta0 must"):
        vanilla_alpha(beta, 0.1)
    policy, teacher, mask, alpha = hand_batch()
    with pytest.raises(ValueError, match=r"^beta0 must"):
        aligndistil_loss(policy, teacher, mask, alpha=alpha, beta0=beta)


def test_bad_alpha_and_weighting():
    policy, teacher, mask, alpha = hand_batch()
    with pytest.raises(ValueError, match="weighting"):
        aligndistil_loss(policy, teacher, mask, alpha=alpha, weighting="beta")
    with pytest.raises(ValueError, match="alpha"):
        aligndistil_loss(policy, teacher, mask, alpha=-0.5)  # e.g. a vanilla teacher's alpha passed by mistake
    with pytest.raises(ValueError, match="alpha"):
        aligndistil_loss(policy, teacher, mask, alpha=alpha[:, :1])
    with pytest.raises(ValueError, match="alpha"):
        aligndistil_teacher_logits(teacher, teacher, alpha[:1])
    with pytest.raises(ValueError, match="alpha"):
        aligndistil_teacher_logits(teacher, teacher, float("inf"))


def test_bad_shapes_and_masks():
    policy, teacher, mask, alpha = hand_batch()
    with pytest.raises(ValueError, match="teacher_logits"):
        aligndistil_loss(policy, teacher[..., :1], mask, alpha=alpha)
    with pytest.raises(ValueError, match="mask"):
        aligndistil_loss(policy, teacher, mask[:, :1], alpha=alpha)
    with pytest.raises(ValueError, match="policy_logits"):
        aligndistil_loss(policy[0], teacher, mask, alpha=alpha)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="mask has no response token"):
        aligndistil_loss(policy, teacher, empty, alpha=alpha)
    with pytest.raises(ValueError, match="base_logits"):
        aligndistil_teacher_logits(teacher, teacher[..., :1], 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits(bad):
    policy, teacher, mask, alpha = hand_batch()
    p = policy.detach().clone()
    p[0, 1, 0] = bad
    with pytest.raises(ValueError, match="policy_logits"):
        aligndistil_loss(p, teacher, mask, alpha=alpha)
    q = teacher.clone()
    q[1, 0, 1] = bad
    with pytest.raises(ValueError, match="teacher_logits"):
        aligndistil_loss(policy, q, mask, alpha=alpha)
    with pytest.raises(ValueError, match="negative_logits"):
        aligndistil_teacher_logits(teacher, q, 1.0)


def test_vanilla_teacher_logs_its_own_alpha_and_weights_tokens_by_beta():
    """Eq. 11's teacher z_dpo + (beta0/beta - 1)(z_dpo - z_ref): with beta0 = 0.1, beta = 0.04
    its alpha is 1.5 (what alpha/mean must report), while every token is weighted by beta = 0.04
    (not beta0/alpha = 0.0667)."""
    kl = torch.tensor([[0.2, 0.4], [0.6, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    alpha = vanilla_alpha(0.1, 0.04)
    assert alpha == pytest.approx(1.5, abs=1e-12)
    losses, m = aligndistil_loss_from_stats(kl, mask, alpha=alpha, beta0=0.1, beta=0.04)
    assert losses.tolist() == pytest.approx([0.04 * (0.2 + 0.4) / 2, 0.04 * 0.6], abs=1e-12)
    assert m["alpha/mean"].tolist() == pytest.approx([1.5, 1.5], abs=1e-12)
