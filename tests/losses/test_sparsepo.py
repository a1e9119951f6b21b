"""SparsePO loss, SparsePOMask and MaPO mask (docs/math.md, "SparsePO and MaPO")."""

from __future__ import annotations

import math

import pytest
import torch

import _spec_naive as naive
from aligndistil.losses import SparsePOMask, mapo_mask, mask_sparsity, sparsepo_loss, tdpo_loss

F64 = torch.float64
L2, L3 = math.log(2.0), math.log(3.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_pair():
    """Same pair as test_tdpo.hand_pair (B = 1, V = 2, chosen 2 tokens, rejected 1 + padding).

    chosen  t0: policy (1/4, 3/4), label 1, ref (1/2, 1/2)
    chosen  t1: policy (2/3, 1/3), label 0, ref (1/2, 1/2)
    rejected t0: policy (1/2, 1/2), label 0, ref (3/4, 1/4)
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


def test_sparsepo_hand_value():
    beta, lam_u, lam_d = 0.5, 0.1, 0.01
    mu_c = torch.tensor([[1.0, 0.5]], dtype=F64)
    md_c = torch.tensor([[0.0, 2.0]], dtype=F64)
    mu_r = torch.tensor([[2.0, 7.0]], dtype=F64)  # 7.0 sits on padding: ignored everywhere
    md_r = torch.tensor([[1.0, 7.0]], dtype=F64)
    losses, m = sparsepo_loss(*hand_pair(), mu_c, mu_r, md_c, md_r, beta=beta, lambda_u=lam_u, lambda_d=lam_d)

    r_w0 = math.log(3 / 4) - math.log(1 / 2)
    r_w1 = math.log(2 / 3) - math.log(1 / 2)
    r_l0 = math.log(1 / 2) - math.log(3 / 4)
    kl_w0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)       # KL(ref || theta)
    kl_w1 = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    kl_l0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    u = beta * (1.0 * r_w0 + 0.5 * r_w1) - beta * (2.0 * r_l0)
    delta = beta * (1.0 * kl_l0) - beta * (0.0 * kl_w0 + 2.0 * kl_w1)
    l1_u = 1.0 + 0.5 + 2.0   # chosen (1, 0.5) + rejected (2); the 7 is on padding
    l1_d = 0.0 + 2.0 + 1.0
    expected = -math.log(sig(u - delta)) + lam_u * l1_u + lam_d * l1_d
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # one exact zero among the 6 mask entries on response tokens
    assert m["mask/sparsity"].item() == pytest.approx(1 / 6, abs=1e-7)
    assert m["mask/reward_mean"].item() == pytest.approx(3.5 / 3, abs=1e-12)
    assert m["mask/kl_mean"].item() == pytest.approx(3.0 / 3, abs=1e-12)
    # rewards metric: masked token rewards
    assert m["rewards/chosen"].item() == pytest.approx(beta * (r_w0 + 0.5 * r_w1), abs=1e-12)


def test_mask_sparsity_counts_only_response_tokens():
    masks = [torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])]
    resp = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]])]
    # response entries: (0, 1) and (2, 0, 0): zeros = 1 + 2 = 3 of 5
    assert mask_sparsity(masks, resp).item() == pytest.approx(3 / 5)


# ---------------------------------------------------------------- random data + properties

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


def random_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.2 + torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True) for _ in range(4)]


def test_ones_and_zero_lambda_equals_tdpo1_exactly():
    args = random_pair(seed=1)
    pc, pr = args[0], args[1]
    ones = [torch.ones(B, T, dtype=F64) for _ in range(4)]
    sp, msp = sparsepo_loss(*args, *ones, beta=0.3, lambda_u=0.0, lambda_d=0.0)
    td, mtd = tdpo_loss(*args, variant=1, beta=0.3)
    assert torch.equal(sp, td)
    g_sp = torch.autograd.grad(sp.sum(), (pc, pr))
    g_td = torch.autograd.grad(td.sum(), (pc, pr))
    for a, b in zip(g_sp, g_td):
        assert torch.equal(a, b)
    for k in mtd:
        assert torch.equal(msp[k], mtd[k])
    assert msp["mask/sparsity"].item() == 0.0


def test_sparsepo_matches_naive_value_and_grad():
    args = random_pair(seed=2)
    pc, pr = args[0], args[1]
    mu_c, mu_r, md_c, md_r = random_masks(seed=3)
    got, _ = sparsepo_loss(*args, mu_c, mu_r, md_c, md_r, beta=0.4, lambda_u=0.05, lambda_d=0.02)
    want = naive.token_level_dpo(*args, beta=0.4, mu_c=mu_c, mu_r=mu_r, md_c=md_c, md_r=md_r,
                                 lambda_u=0.05, lambda_d=0.02)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = (pc, pr, mu_c, mu_r, md_c, md_r)
    for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sparsepo_gradcheck_policy_and_masks():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=4)
    masks = random_masks(seed=5)

    def f(x, y, a, b, c, d):
        return sparsepo_loss(x, y, rc, rr, lc, lr, mc, mr, a, b, c, d, beta=0.4, lambda_u=0.05, lambda_d=0.02)[0]

    # fast_mode (random projections of the Jacobian) keeps 60 input entries cheap
    assert torch.autograd.gradcheck(f, (pc, pr, *masks), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: f(x, pr, *masks), (pc,))


def test_zero_kl_mask_removes_kl_gradient():
    # m_d = 0 everywhere: the loss is -log sigma(u) and only the labels' log-probs matter, so
    # shifting the policy logits of NON-label tokens in a way that keeps log pi(y_t) fixed
    # (moving mass between two non-label tokens) leaves the loss unchanged.
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair(seed=6)
    ones = torch.ones(B, T, dtype=F64)
    zeros = torch.zeros(B, T, dtype=F64)
    base, _ = sparsepo_loss(pc, pr, rc, rr, lc, lr, mc, mr, ones, ones, zeros, zeros, beta=0.4)
    pc2 = pc.detach().clone()
    for b in range(B):
        for t in range(T):
            others = [v for v in range(V) if v != int(lc[b, t])]
            # swap the two non-label logits: same logsumexp, same label logit
            pc2[b, t, others[0]], pc2[b, t, others[1]] = pc[b, t, others[1]].item(), pc[b, t, others[0]].item()
    moved, _ = sparsepo_loss(pc2, pr, rc, rr, lc, lr, mc, mr, ones, ones, zeros, zeros, beta=0.4)
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-14)
    with_kl, _ = sparsepo_loss(pc2, pr, rc, rr, lc, lr, mc, mr, ones, ones, ones, ones, beta=0.4)
    base_kl, _ = sparsepo_loss(pc, pr, rc, rr, lc, lr, mc, mr, ones, ones, ones, ones, beta=0.4)
    assert (with_kl - base_kl).abs().max() > 1e-4


# ----------------------------------------------------------------------------- SparsePOMask


def hand_hidden():
    # (L = 2, B = 1, T = 3, d = 2)
    return torch.tensor([
        [[[1.0, 2.0], [-1.0, 3.0], [3.0, 0.0]]],   # layer 0
        [[[0.0, 1.0], [4.0, -2.0], [0.0, -4.0]]],  # layer 1
    ], dtype=F64)


def set_mask_net(net: SparsePOMask, k: int, w, b, wo):
    with torch.no_grad():
        net.layer_weight[k] = torch.tensor(w, dtype=net.layer_weight.dtype)
        net.layer_bias[k] = torch.tensor(b, dtype=net.layer_bias.dtype)
        net.merge_weight[k] = torch.tensor(wo, dtype=net.merge_weight.dtype)


def test_sparsepo_mask_shared_hand_value():
    net = SparsePOMask(num_layers=2, hidden_size=2, shared=True).double()
    # w^(0) = (1, 0), b^(0) = 0 ; w^(1) = (0, -1), b^(1) = 0.5 ; w_o = (2, -1)
    set_mask_net(net, 0, [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.5], [2.0, -1.0])
    m_u, m_d = net(hand_hidden())
    # token 0: m0 = ReLU(1*1 + 0*2 + 0) = 1 ; m1 = ReLU(0*0 - 1*1 + 0.5) = ReLU(-0.5) = 0
    #          m = ReLU(2*1 - 1*0) = 2
    # token 1: m0 = ReLU(-1) = 0 ; m1 = ReLU(-1*-2 + 0.5) = 2.5 ; m = ReLU(0 - 2.5) = 0
    # token 2: m0 = ReLU(3) = 3 ; m1 = ReLU(-1*-4 + 0.5) = 4.5 ; m = ReLU(6 - 4.5) = 1.5
    assert m_u.shape == (1, 3)
    assert m_u.tolist() == [[2.0, 0.0, 1.5]]
    assert torch.equal(m_d, m_u)  # shared: m_u = m_d
    # a list of per-layer tensors is the same input
    m_list, _ = net([hand_hidden()[0], hand_hidden()[1]])
    assert torch.equal(m_list, m_u)


def test_sparsepo_mask_independent_hand_value():
    net = SparsePOMask(num_layers=2, hidden_size=2, shared=False).double()
    set_mask_net(net, 0, [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.5], [2.0, -1.0])
    # second network: w^(0) = (0, 1), b^(0) = -1 ; w^(1) = (1, 1), b^(1) = 0 ; w_o = (1, 1)
    set_mask_net(net, 1, [[0.0, 1.0], [1.0, 1.0]], [-1.0, 0.0], [1.0, 1.0])
    m_u, m_d = net(hand_hidden())
    assert m_u.tolist() == [[2.0, 0.0, 1.5]]
    # token 0: m0 = ReLU(2 - 1) = 1 ; m1 = ReLU(0 + 1) = 1 ; m = 2
    # token 1: m0 = ReLU(3 - 1) = 2 ; m1 = ReLU(4 - 2) = 2 ; m = 4
    # token 2: m0 = ReLU(0 - 1) = 0 ; m1 = ReLU(0 - 4) = 0 ; m = 0
    assert m_d.tolist() == [[2.0, 4.0, 0.0]]


def test_sparsepo_mask_init_near_ones_and_trains():
    torch.manual_seed(0)
    net = SparsePOMask(num_layers=3, hidden_size=8).double()
    H = torch.randn(3, 2, 4, 8, dtype=F64)
    m_u, m_d = net(H)
    assert ((m_u - 1).abs() < 0.05).all()
    # gradients reach the mask parameters through the SparsePO loss
    args = random_pair(seed=7)
    m_u, m_d = net(torch.randn(3, B, T, 8, dtype=F64))
    losses, _ = sparsepo_loss(*args, m_u, m_u, m_d, m_d, beta=0.4, lambda_u=1e-3, lambda_d=1e-3)
    losses.sum().backward()
    for p in net.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sparsepo_mask_bad_input():
    net = SparsePOMask(num_layers=2, hidden_size=2)
    with pytest.raises(ValueError, match="hidden_states"):
        net(torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="hidden_states"):
        net(torch.zeros(2, 1, 2, 5))
    with pytest.raises(ValueError, match="num_layers"):
        SparsePOMask(num_layers=0, hidden_size=2)


# -------------------------------------------------------------------------------- MaPO mask


def acts(means):
    """(B, T, 2) activations whose mean over the hidden dim is ``means``."""
    s = torch.tensor(means, dtype=F64)
    return torch.stack([s - 1.0, s + 1.0], dim=-1)


def test_mapo_mask_hand_value():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=F64)
    a1 = acts([[1.0, 2.0, 4.0], [5.0, 1.0, 100.0], [3.0, 9.0, 9.0]])
    a2 = acts([[3.0, 0.0, 0.0], [2.0, 0.0, -100.0], [1.0, -9.0, 9.0]])
    m = mapo_mask([a1, a2], mask, eps=1e-12)

    # row 0: s1 = (1, 2, 4): mean 7/3, var = (16/9 + 1/9 + 25/9)/3 = 42/27
    mean1, std1 = 7 / 3, math.sqrt(42 / 27)
    z1 = [(s - mean1) / std1 for s in (1.0, 2.0, 4.0)]
    #        s2 = (3, 0, 0): mean 1, var = (4 + 1 + 1)/3 = 2
    z2 = [(s - 1.0) / math.sqrt(2.0) for s in (3.0, 0.0, 0.0)]
    avg = [(a + b) / 2 for a, b in zip(z1, z2)]
    lo, hi = min(avg), max(avg)
    expected0 = [(a - lo) / (hi - lo) for a in avg]
    assert m[0].tolist() == pytest.approx(expected0, abs=1e-10)
    # row 1 (2 response tokens, padding holds +-100 that must not matter):
    #   s1 = (5, 1): z1 = (1, -1) ; s2 = (2, 0): z2 = (1, -1) ; avg = (1, -1) -> (1, 0), pad 0
    assert m[1].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-10)
    # row 2: one response token carries no ranking -> mask 1 there (TDPO1 weighting), pad 0
    assert m[2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-10)


def test_mapo_mask_range_and_padding():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    activations = [torch.randn(2, 5, 4, generator=g) * (i + 1) for i in range(3)]
    m = mapo_mask(activations, mask)
    assert (m >= 0).all() and (m <= 1).all()
    assert (m[mask == 0] == 0).all()
    for b in range(2):
        row = m[b][mask[b] > 0]
        assert row.min().item() == 0.0 and row.max().item() == pytest.approx(1.0)


def test_mapo_mask_bad_input():
    mask = torch.tensor([[1.0, 1.0]])
    with pytest.raises(ValueError, match="activations"):
        mapo_mask([], mask)
    with pytest.raises(ValueError, match="activations\\[1\\]"):
        mapo_mask([torch.zeros(1, 2, 3), torch.zeros(1, 3, 3)], mask)
    with pytest.raises(ValueError, match="mask"):
        mapo_mask([torch.zeros(1, 2, 3)], torch.zeros(1, 2))


# ------------------------------------------------------------------------------- bad input


def test_bad_masks_and_coefficients():
    args = random_pair()
    ones = torch.ones(B, T, dtype=F64)
    neg = ones.clone()
    neg[0, 1] = -0.1
    with pytest.raises(ValueError, match="rejected_kl_mask"):
        sparsepo_loss(*args, ones, ones, ones, neg)
    with pytest.raises(ValueError, match="chosen_reward_mask"):
        sparsepo_loss(*args, ones[:, :2], ones, ones, ones)
    nan = ones.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match="rejected_reward_mask"):
        sparsepo_loss(*args, ones, nan, ones, ones)
    with pytest.raises(ValueError, match="lambda_u"):
        sparsepo_loss(*args, ones, ones, ones, ones, lambda_u=-1e-3)
    with pytest.raises(ValueError, match="lambda_d"):
        sparsepo_loss(*args, ones, ones, ones, ones, lambda_d=-1e-3)
    with pytest.raises(ValueError, match="beta"):
        sparsepo_loss(*args, ones, ones, ones, ones, beta=0.0)


def test_bad_logits_and_response_masks():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair()
    ones = torch.ones(B, T, dtype=F64)
    bad = pc.detach().clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="policy_chosen_logits"):
        sparsepo_loss(bad, pr, rc, rr, lc, lr, mc, mr, ones, ones, ones, ones)
    empty = mc.clone()
    empty[0] = 0
    with pytest.raises(ValueError, match="chosen_mask"):
        sparsepo_loss(pc, pr, rc, rr, lc, lr, empty, mr, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="reference_rejected_logits"):
        sparsepo_loss(pc, pr, rc, rr[..., :2], lc, lr, mc, mr, ones, ones, ones, ones)


def test_loss_and_config_defaults_of_the_l1_weights_agree():
    """One default for lambda_u and lambda_d: the loss's L1_WEIGHT, which MethodConfig repeats
    (the config room cannot import losses); a call without them pays L1_WEIGHT * sum |m|."""
    import inspect

    from aligndistil.config import MethodConfig
    from aligndistil.losses.sparsepo import L1_WEIGHT, sparsepo_loss_from_stats

    assert L1_WEIGHT == 1e-3
    assert MethodConfig().lambda_u == MethodConfig().lambda_d == L1_WEIGHT
    for fn in (sparsepo_loss, sparsepo_loss_from_stats):
        params = inspect.signature(fn).parameters
        assert params["lambda_u"].default == params["lambda_d"].default == L1_WEIGHT
    args = hand_pair()
    ones = torch.ones(1, 2, dtype=F64)
    zeros = torch.zeros(1, 2, dtype=F64)
    base, _ = sparsepo_loss(*args, ones, ones, zeros, zeros, beta=0.4, lambda_u=0.0, lambda_d=0.0)
    default, _ = sparsepo_loss(*args, ones, ones, zeros, zeros, beta=0.4)
    # m_u = 1 on the pair's 3 response tokens (chosen 2, rejected 1; padding does not count), m_d = 0:
    # the default adds lambda_u * 3 = 3e-3.
    torch.testing.assert_close(default - base, torch.tensor([3e-3], dtype=F64), rtol=0, atol=1e-15)
