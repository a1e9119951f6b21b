"""Sequence-level preference losses (DPO, reverse DPO, IPO, SimPO, DPOP, KTO) against docs/math.md.

Hand-computed values use sequence log-probs chosen as round numbers; the arithmetic is
spelled out with ``math`` on scalars. Gradients are checked with ``gradcheck`` and against
the naive loop implementation in ``_spec_naive`` (both w.r.t. the policy LOGITS, through
``label_logps``).
"""

from __future__ import annotations

import math

import pytest
import torch

import _spec_naive as naive
from aligndistil.losses.ops import label_logps
from aligndistil.losses import dpo_loss, dpop_loss, ipo_loss, kto_loss, simpo_loss

F64 = torch.float64


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(x):
    return torch.tensor(x, dtype=F64)


# Per-token log-probs of one pair, B = 1, with padding entries that must be ignored:
#   policy   y_w: -0.5 + -0.5        = -1.0   (the -7.0 is padding)
#   policy   y_l: -1.0 + -1.0 + -1.0 = -3.0
#   ref      y_w: -1.0 + -1.0        = -2.0   (the 3.0 is padding)
#   ref      y_l: -1.0 + -1.0 + -1.0 = -3.0
PC = [[-0.5, -0.5, -7.0]]
PR = [[-1.0, -1.0, -1.0]]
RC = [[-1.0, -1.0, 3.0]]
RR = [[-1.0, -1.0, -1.0]]
MC = [[1.0, 1.0, 0.0]]
MR = [[1.0, 1.0, 1.0]]


def pair():
    return t(PC), t(PR), t(RC), t(RR), t(MC), t(MR)


# ----------------------------------------------------------------------------- hand values


def test_dpo_hand_value():
    pc, pr, rc, rr, mc, mr = pair()
    losses, m = dpo_loss(pc, pr, rc, rr, mc, mr, beta=0.5)
    # Delta_theta = -1 - (-3) = 2 ; Delta_ref = -2 - (-3) = 1
    # loss = -log sigma(0.5 * (2 - 1)) = -log sigma(0.5) = log(1 + e^-0.5)
    expected = -math.log(sig(0.5))
    assert expected == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-15)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # rewards: chosen 0.5*(-1 - -2) = 0.5 ; rejected 0.5*(-3 - -3) = 0
    assert m["rewards/chosen"].item() == pytest.approx(0.5, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.5, abs=1e-12)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == pytest.approx(-1.0, abs=1e-12)
    assert m["logps/rejected"].item() == pytest.approx(-3.0, abs=1e-12)


def test_dpo_hand_value_sequence_sums_batch():
    # mask=None: inputs are already sequence log-probs, B = 2.
    # row 0: Delta_theta = -1 - -3 = 2, Delta_ref = -2 - -3 = 1 -> x = 0.1 * 1 = 0.1
    # row 1: Delta_theta = -4 - -2 = -2, Delta_ref = -3 - -3 = 0 -> x = 0.1 * -2 = -0.2
    losses, _ = dpo_loss(t([-1.0, -4.0]), t([-3.0, -2.0]), t([-2.0, -3.0]), t([-3.0, -3.0]), beta=0.1)
    assert losses[0].item() == pytest.approx(-math.log(sig(0.1)), abs=1e-12)
    assert losses[1].item() == pytest.approx(-math.log(sig(-0.2)), abs=1e-12)


def test_reverse_dpo_hand_value():
    pc, pr, rc, rr, mc, mr = pair()
    losses, m = dpo_loss(pc, pr, rc, rr, mc, mr, beta=0.5, reverse=True)
    # swapped pair: Delta_theta = -3 - (-1) = -2 ; Delta_ref = -3 - (-2) = -1
    # loss = -log sigma(0.5 * (-2 + 1)) = -log sigma(-0.5) = log(1 + e^0.5)
    expected = math.log(1 + math.exp(0.5))
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # metrics describe the promoted response (the original y_l): reward 0.5*(-3 - -3) = 0
    assert m["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("beta, expected", [
    # h = Delta_theta - Delta_ref = 2 - 1 = 1
    (0.25, (1.0 - 1.0 / (2 * 0.25)) ** 2),  # (1 - 2)^2 = 1
    (1.0, (1.0 - 1.0 / (2 * 1.0)) ** 2),    # (1 - 0.5)^2 = 0.25
])
def test_ipo_hand_value(beta, expected):
    pc, pr, rc, rr, mc, mr = pair()
    losses, _ = ipo_loss(pc, pr, rc, rr, mc, mr, beta=beta)
    assert losses.item() == pytest.approx(expected, abs=1e-12)


def test_ipo_uses_sequence_sums_not_token_means():
    # Same pair but y_w has 2 tokens and y_l has 3: a token-MEAN IPO (TRL's) would give
    # h = (-0.5 - -1) - (-1 - -1) = 0.5, (0.5 - 2)^2 = 2.25 at beta 0.25, not 1.
    pc, pr, rc, rr, mc, mr = pair()
    losses, _ = ipo_loss(pc, pr, rc, rr, mc, mr, beta=0.25)
    assert losses.item() != pytest.approx(2.25)
    losses, _ = ipo_loss(pc, pr, rc, rr, mc, mr, beta=0.25, logps="mean")
    assert losses.item() == pytest.approx(2.25, abs=1e-12)


# Two response tokens on each side (the 9.0 is padding), B = 1:
#   policy y_w: -0.2 + -0.6 = -0.8 (mean -0.4)     ref y_w: -0.5 + -0.5 = -1.0 (mean -0.5)
#   policy y_l: -1.0 + -2.0 = -3.0 (mean -1.5)     ref y_l: -1.0 + -1.0 = -2.0 (mean -1.0)
# beta = 0.5, so 1/(2 beta) = 1:
#   sum:  h = (-0.8 - -3.0) - (-1.0 - -2.0) = 2.2 - 1.0 = 1.2 ; loss (1.2 - 1)^2 = 0.04
#   mean: h = (-0.4 - -1.5) - (-0.5 - -1.0) = 1.1 - 0.5 = 0.6 ; loss (0.6 - 1)^2 = 0.16
#   mean rewards: chosen 0.5 * (-0.4 - -0.5) = 0.05, rejected 0.5 * (-1.5 - -1.0) = -0.25
def two_token_pair():
    return (t([[-0.2, -0.6, 9.0]]), t([[-1.0, -2.0, 9.0]]), t([[-0.5, -0.5, 9.0]]), t([[-1.0, -1.0, 9.0]]),
            t([[1.0, 1.0, 0.0]]), t([[1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("logps, expected, chosen, rejected", [("sum", 0.04, 0.1, -0.5), ("mean", 0.16, 0.05, -0.25)])
def test_ipo_sum_and_mean_forms_by_hand(logps, expected, chosen, rejected):
    losses, m = ipo_loss(*two_token_pair(), beta=0.5, logps=logps)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(chosen, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(rejected, abs=1e-12)


def test_ipo_form_is_checked_and_mean_needs_masks():
    pc, pr, rc, rr, mc, mr = two_token_pair()
    with pytest.raises(ValueError, match="logps must be one of sum, mean, got 'avg'"):
        ipo_loss(pc, pr, rc, rr, mc, mr, logps="avg")
    with pytest.raises(ValueError, match="needs per-token log-probs"):
        ipo_loss(t([-0.8]), t([-3.0]), t([-1.0]), t([-2.0]), logps="mean")


def test_the_ipo_declaration_passes_method_ipo_logps(monkeypatch):
    """method.ipo_logps reaches the loss through the ipo declaration (train/methods.py), with the
    same allowed values as the loss; the default is the sum."""
    from dataclasses import fields

    from aligndistil.config import ConfigError, MethodConfig, RunConfig, apply_overrides
    from aligndistil.losses.dpo import IPO_LOGPS
    from aligndistil.train import methods as M

    assert MethodConfig().ipo_logps == "sum" and "ipo_logps" in M.get_method(MethodConfig(name="ipo")).params
    pair_ = two_token_pair()
    monkeypatch.setattr(M, "_pair_logps", lambda ctx, batch, **kw: (pair_[:2], pair_[2:4], pair_[4:]))
    for logps, expected in (("sum", 0.04), ("mean", 0.16)):
        cfg = apply_overrides(RunConfig(), ["method.name=ipo", "method.beta=0.5", f"method.ipo_logps={logps}"]).method
        losses, _ = M.get_method(cfg).loss(M.StepContext(policy=None, frozen={}, cfg=cfg), {})
        assert losses.item() == pytest.approx(expected, abs=1e-12)
    check = next(f for f in fields(MethodConfig) if f.name == "ipo_logps").metadata["check"]
    assert all(check.ok(v) for v in IPO_LOGPS) and not check.ok("avg")
    with pytest.raises(ConfigError, match="method.ipo_logps must be sum or mean, got 'avg'") as info:
        apply_overrides(RunConfig(), ["method.ipo_logps=avg"]).validate()
    assert info.value.exit_code == 2


def test_simpo_hand_value():
    # y_w: (-1) + (-2) = -3 over |y_w| = 2 tokens (9.0 is padding) -> mean -1.5
    # y_l: 3 * (-3) = -9 over |y_l| = 3 tokens -> mean -3
    # beta = 2, gamma = 1: x = 2 * -1.5 - 2 * -3 - 1 = -3 + 6 - 1 = 2 ; loss = log(1 + e^-2)
    losses, m = simpo_loss(t([[-1.0, -2.0, 9.0]]), t([[-3.0, -3.0, -3.0]]), t([[1.0, 1.0, 0.0]]), t([[1.0, 1.0, 1.0]]),
                           beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(-3.0, abs=1e-12)   # 2 * -1.5
    assert m["rewards/rejected"].item() == pytest.approx(-6.0, abs=1e-12)  # 2 * -3


def test_simpo_defaults_are_spec_values():
    # beta = 10, gamma / beta = 0.5. Equal rewards -> x = -gamma = -5.
    losses, _ = simpo_loss(t([[-1.0]]), t([[-1.0]]), t([[1.0]]), t([[1.0]]))
    assert losses.item() == pytest.approx(-math.log(sig(-5.0)), abs=1e-12)


def test_dpop_hand_value():
    # mask=None, B = 2, beta = 0.1, lambda = 50 (default)
    # row 0: pc=-2, pr=-3, rc=-1.5, rr=-3: policy fell below ref on y_w
    #   Delta_theta - Delta_ref = (-2 + 3) - (-1.5 + 3) = 1 - 1.5 = -0.5
    #   penalty = max(0, -1.5 - -2) = 0.5
    #   x = 0.1 * (-0.5 - 50 * 0.5) = 0.1 * -25.5 = -2.55
    # row 1: pc=-1, pr=-3, rc=-2, rr=-3: penalty = max(0, -2 - -1) = 0 -> plain DPO
    #   x = 0.1 * ((-1 + 3) - (-2 + 3)) = 0.1
    losses, m = dpop_loss(t([-2.0, -1.0]), t([-3.0, -3.0]), t([-1.5, -2.0]), t([-3.0, -3.0]), beta=0.1)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(2.55)), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-12)
    assert m["dpop/penalty"].tolist() == pytest.approx([0.5, 0.0], abs=1e-12)


def test_kto_hand_value():
    # mask=None, r = log pi_theta - log pi_ref: row 0: -1 - -2 = 1 ; row 1: -2 - -1 = -1
    # z0 = 0.5, beta = 1, lambda_D = 2, lambda_U = 3
    # row 0 desirable:   2 * (1 - sigma(1 * (1 - 0.5)))  = 2 * (1 - sigma(0.5))
    # row 1 undesirable: 3 * (1 - sigma(1 * (0.5 - -1))) = 3 * (1 - sigma(1.5))
    desirable = torch.tensor([True, False])
    losses, m = kto_loss(t([-1.0, -2.0]), t([-2.0, -1.0]), None, desirable, 0.5,
                         beta=1.0, desirable_weight=2.0, undesirable_weight=3.0)
    assert losses[0].item() == pytest.approx(2 * (1 - sig(0.5)), abs=1e-12)
    assert losses[1].item() == pytest.approx(3 * (1 - sig(1.5)), abs=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([1.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([-1.0])


def test_kto_reference_point_clamped_and_detached():
    # z0 = -4 is clamped to 0: row 0: 2 (1 - sigma(1)) ; row 1: 3 (1 - sigma(0 - -1)) = 3 (1 - sigma(1))
    z0 = torch.tensor(-4.0, dtype=F64, requires_grad=True)
    pol = t([-1.0, -2.0]).requires_grad_(True)
    losses, m = kto_loss(pol, t([-2.0, -1.0]), None, torch.tensor([True, False]), z0,
                         beta=1.0, desirable_weight=2.0, undesirable_weight=3.0)
    assert losses[0].item() == pytest.approx(2 * (1 - sig(1.0)), abs=1e-12)
    assert losses[1].item() == pytest.approx(3 * (1 - sig(1.0)), abs=1e-12)
    assert m["kl"].item() == 0.0
    losses.sum().backward()
    assert z0.grad is None
    assert pol.grad is not None


# ------------------------------------------------------------------------------- properties


def test_reverse_dpo_equals_swapped_pair():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(4))
    mc = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=F64)
    mr = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=F64)
    rev, mrev = dpo_loss(pc, pr, rc, rr, mc, mr, beta=0.3, reverse=True)
    swp, mswp = dpo_loss(pr, pc, rr, rc, mr, mc, beta=0.3)
    assert torch.equal(rev, swp)
    for k in mswp:
        assert torch.equal(mrev[k], mswp[k])
    # and it really differs from forward DPO
    fwd, _ = dpo_loss(pc, pr, rc, rr, mc, mr, beta=0.3)
    assert not torch.allclose(fwd, rev)


# ---------------------------------------------------------------------- gradients vs naive

B, T, V = 2, 3, 3


def random_pair_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    pr = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    rr = torch.randn(B, T, V, generator=g, dtype=F64)
    lc = torch.randint(0, V, (B, T), generator=g)
    # Reference = policy shifted on the chosen labels: +1 in row 0 (so log pi_ref(y_w) >
    # log pi_theta(y_w) and DPOP's penalty is active), -1 in row 1 (penalty inactive).
    bump = torch.nn.functional.one_hot(lc, V).to(F64) * torch.tensor([1.0, -1.0], dtype=F64)[:, None, None]
    rc = pc.detach() + bump + 0.1 * torch.randn(B, T, V, generator=g, dtype=F64)
    lr = torch.randint(0, V, (B, T), generator=g)
    mc = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    mr = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=F64)
    return pc, pr, rc, rr, lc, lr, mc, mr


def pkg_pair(fn, pc, pr, rc, rr, lc, lr, mc, mr, **kw):
    return fn(label_logps(pc, lc), label_logps(pr, lr), label_logps(rc, lc), label_logps(rr, lr), mc, mr, **kw)[0]


PAIR_CASES = [
    ("dpo", lambda *a: pkg_pair(dpo_loss, *a, beta=0.7), lambda *a: naive.dpo(*a, beta=0.7)),
    ("reverse_dpo", lambda *a: pkg_pair(dpo_loss, *a, beta=0.7, reverse=True),
     lambda *a: naive.dpo(*a, beta=0.7, reverse=True)),
    ("ipo", lambda *a: pkg_pair(ipo_loss, *a, beta=0.4), lambda *a: naive.ipo(*a, beta=0.4)),
    ("dpop", lambda *a: pkg_pair(dpop_loss, *a, beta=0.2, lambda_=5.0), lambda *a: naive.dpop(*a, beta=0.2, lam=5.0)),
]


@pytest.mark.parametrize("name, pkg, ref", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_pair_loss_matches_naive_value_and_grad(name, pkg, ref):
    args = random_pair_logits(seed=3)
    pc, pr = args[0], args[1]
    got = pkg(*args)
    want = ref(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), (pc, pr))
    g_want = torch.autograd.grad(want.sum(), (pc, pr))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: pkg(x, y, *args[2:]), (pc, pr))


def test_dpop_naive_exercises_the_penalty():
    # Make sure the random case above is not trivially penalty-free: row values of pc - rc.
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair_logits(seed=3)
    _, m = dpop_loss(label_logps(pc, lc), label_logps(pr, lr), label_logps(rc, lc), label_logps(rr, lr), mc, mr,
                     beta=0.2, lambda_=5.0)
    assert m["dpop/penalty"][0] > 0.1 and m["dpop/penalty"][1] == 0


def test_simpo_matches_naive_value_and_grad():
    pc, pr, rc, rr, lc, lr, mc, mr = random_pair_logits(seed=4)

    def pkg(x, y):
        return simpo_loss(label_logps(x, lc), label_logps(y, lr), mc, mr, beta=2.5, gamma=0.75)[0]

    got = pkg(pc, pr)
    want = naive.simpo(pc, pr, lc, lr, mc, mr, beta=2.5, gamma=0.75)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (pc, pr)), torch.autograd.grad(want.sum(), (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(pkg, (pc, pr))


def test_kto_matches_naive_value_and_grad():
    g = torch.Generator().manual_seed(5)
    pol = torch.randn(3, T, V, generator=g, dtype=F64, requires_grad=True)
    ref = torch.randn(3, T, V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (3, T), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=F64)
    desirable = torch.tensor([True, False, True])

    def pkg(x):
        return kto_loss(label_logps(x, labels), label_logps(ref, labels), mask, desirable, 0.3,
                        beta=0.8, desirable_weight=1.5, undesirable_weight=0.7)[0]

    got = pkg(pol)
    want = naive.kto(pol, ref, labels, mask, desirable, 0.3, beta=0.8, lam_d=1.5, lam_u=0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), pol)[0], torch.autograd.grad(want.sum(), pol)[0],
                               rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(pkg, (pol,))


# ------------------------------------------------------------------------------- bad input


def test_bad_beta():
    pc, pr, rc, rr, mc, mr = pair()
    for fn in (dpo_loss, ipo_loss, dpop_loss):
        for beta in (0.0, -0.1, float("nan")):
            with pytest.raises(ValueError, match="beta"):
                fn(pc, pr, rc, rr, mc, mr, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(pc, pr, mc, mr, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(pc, rc, mc, torch.tensor([True]), 0.0, beta=-1.0)


def test_bad_shape():
    pc, pr, rc, rr, mc, mr = pair()
    with pytest.raises(ValueError, match="chosen_mask"):
        dpo_loss(pc, pr, rc, rr, mc[:, :2], mr)
    # A (B, T) log-prob tensor that does not match its mask: the message names both.
    with pytest.raises(ValueError, match="reference_rejected_logps .* rejected_mask"):
        dpo_loss(pc, pr, rc, rr[:, :2], mc, mr)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(pc, pr, rc, rr, None, mr)  # (B, T) log-probs but chosen_mask None: must be (B,) sums
    with pytest.raises(ValueError, match="policy_chosen_logps has batch size 2 but policy_rejected_logps"):
        dpo_loss(t([-1.0, -2.0]), t([-1.0]), t([-1.0, -2.0]), t([-1.0]))
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(pc, rc, mc, torch.tensor([True, False]), 0.0)


def test_bad_shape_sequence_sums_reference_batch():
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        dpo_loss(t([-1.0, -2.0]), t([-1.0, -2.0]), t([-1.0]), t([-1.0, -2.0]))


def test_empty_mask_row():
    pc, pr, rc, rr, mc, mr = pair()
    with pytest.raises(ValueError, match="rejected_mask"):
        dpo_loss(pc, pr, rc, rr, mc, torch.zeros_like(mr))
    with pytest.raises(ValueError, match="chosen_mask"):
        simpo_loss(pc, pr, torch.zeros_like(mc), mr)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logps(bad):
    pc, pr, rc, rr, mc, mr = pair()
    pc = pc.clone()
    pc[0, 1] = bad
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(pc, pr, rc, rr, mc, mr)
    with pytest.raises(ValueError, match="kl_reference_point"):
        kto_loss(pr, rr, mr, torch.tensor([True]), bad)


def test_negative_dpop_lambda():
    pc, pr, rc, rr, mc, mr = pair()
    with pytest.raises(ValueError, match="lambda_"):
        dpop_loss(pc, pr, rc, rr, mc, mr, lambda_=-1.0)
