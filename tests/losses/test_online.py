"""The shared pieces of the online methods (aligndistil.losses.online), by hand values.

KL estimators k1/k3 and the exact KL, the token reward of RTO ("DPO Meets PPO", Zhong et al.
2024), the assembly of PPO's per-token reward, GAE and its returns (Schulman et al. 2016),
and advantage whitening. Every expected number is worked out in the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil.losses.online import (
    gae_advantages,
    kl_estimate,
    kl_full,
    kl_k1,
    kl_k3,
    last_token_index,
    log_ratio_token_reward,
    masked_whiten,
    token_rewards,
)
from aligndistil.losses.ops import label_logps

F64 = torch.float64
NAN = float("nan")


def t64(rows):
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------ KL estimators
def test_k3_is_nonnegative_and_second_order_in_k1():
    d = torch.linspace(-8.0, 8.0, 1601, dtype=F64)
    assert bool((kl_k3(d, torch.zeros_like(d)) >= 0).all())
    # d = log 2: exp(-d) + d - 1 = 1/2 + log 2 - 1
    assert kl_k3(t64([math.log(2.0)]), t64([0.0])).item() == pytest.approx(math.log(2.0) - 0.5, abs=1e-15)
    # k3 = d^2/2 - d^3/6 + O(d^4): the relative gap to d^2/2 shrinks like |d|/3
    for x in (1e-1, -1e-1, 1e-2, -1e-2, 1e-3, -1e-3, 1e-5):
        k3 = kl_k3(t64([x]), t64([0.0])).item()
        # Lagrange remainder of the Taylor series, plus the rounding of expm1(-d) + d
        assert abs(k3 - (x * x / 2 - x**3 / 6)) <= x**4 / 24 * math.exp(abs(x)) + 1e-15 * abs(x)
        assert abs(k3 / (x * x / 2) - 1) <= abs(x) / 2
    # k1 is the plain log-ratio, with its sign
    assert kl_k1(t64([-0.3]), t64([0.2])).item() == pytest.approx(-0.5, abs=1e-15)


def test_k1_and_k3_average_to_the_exact_kl_under_the_policy():
    """E_{y~p}[k1] = E_{y~p}[k3] = KL(p || q), by summing over a 4-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    exact = kl_full(p_logits.view(1, 1, 4), q_logits.view(1, 1, 4), torch.ones(1, 1, dtype=F64)).item()
    assert exact == pytest.approx(float((logp.exp() * (logp - logq)).sum()), abs=1e-15)
    assert float((logp.exp() * kl_k1(logp, logq)).sum()) == pytest.approx(exact, abs=1e-14)
    assert float((logp.exp() * kl_k3(logp, logq)).sum()) == pytest.approx(exact, abs=1e-14)


def test_kl_estimate_masks_padding_and_checks_its_name():
    mask = t64([[1, 1, 0]])
    got = kl_estimate(t64([[-1.0, -2.0, NAN]]), t64([[-1.5, -1.0, 3.0]]), mask, estimator="k1")
    assert got.tolist() == [[0.5, -1.0, 0.0]]
    got3 = kl_estimate(t64([[-1.0, -2.0, NAN]]), t64([[-1.5, -1.0, 3.0]]), mask, estimator="k3")
    assert got3[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-15)
    assert got3[0, 2].item() == 0.0
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(t64([[0.0]]), t64([[0.0]]), t64([[1]]), estimator="k2")


# ------------------------------------------------------------------------------ token rewards
def test_rto_token_reward_is_the_clipped_dpo_log_ratio():
    dpo, ref, mask = t64([[0.4, -2.0, 1.5, 0.0]]), t64([[0.0, 0.0, 0.0, 0.0]]), t64([[1, 1, 1, 0]])
    # beta1 (dpo - ref) = 0.05 * (0.4, -2.0, 1.5) = (0.02, -0.1, 0.075); clipped at 0.05
    got = log_ratio_token_reward(dpo, ref, mask, coef=0.05, clip=0.05)
    assert got[0].tolist() == pytest.approx([0.02, -0.05, 0.05, 0.0], abs=1e-15)
    unclipped = log_ratio_token_reward(dpo, ref, mask, coef=0.05)
    assert unclipped[0].tolist() == pytest.approx([0.02, -0.1, 0.075, 0.0], abs=1e-15)


def test_rto_token_reward_equals_the_dpo_log_ratio_at_each_token_of_real_logits():
    """beta1 log pi_dpo(y_t|s_t)/pi_ref(y_t|s_t), with the probabilities taken from softmax directly."""
    g = torch.Generator().manual_seed(1)
    dpo_logits, ref_logits = torch.randn(2, 5, 7, generator=g, dtype=F64), torch.randn(2, 5, 7, generator=g, dtype=F64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    mask = t64([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = log_ratio_token_reward(label_logps(dpo_logits, labels), label_logps(ref_logits, labels), mask, coef=0.05)
    for b in range(2):
        for t in range(5):
            y = labels[b, t]
            want = 0.05 * math.log(dpo_logits[b, t].softmax(-1)[y].item() / ref_logits[b, t].softmax(-1)[y].item())
            assert got[b, t].item() == pytest.approx(want if mask[b, t] else 0.0, abs=1e-14)


def test_token_rewards_put_the_score_on_the_last_token_and_subtract_the_kl():
    mask = t64([[1, 1, 1], [1, 1, 0]])
    score = t64([2.0, -1.0])
    kl = t64([[0.1, -0.2, 0.3], [0.5, 0.5, 9.0]])
    dense = t64([[0.01, 0.02, 0.03], [0.04, 0.05, 7.0]])
    rew, m = token_rewards(mask, score=score, kl=kl, kl_coef=0.1, dense=dense)
    # row 0: (0.01 - 0.01, 0.02 + 0.02, 0.03 - 0.03 + 2); row 1: (0.04 - 0.05, 0.05 - 0.05 - 1, pad)
    assert rew[0].tolist() == pytest.approx([0.0, 0.04, 2.0], abs=1e-15)
    assert rew[1].tolist() == pytest.approx([-0.01, -1.0, 0.0], abs=1e-15)
    assert m["kl/ref"].tolist() == pytest.approx([0.2, 1.0], abs=1e-15)
    assert m["reward/kl_penalty"].tolist() == pytest.approx([0.02, 0.1], abs=1e-15)
    assert m["reward/dense"].tolist() == pytest.approx([0.06, 0.09], abs=1e-15)
    assert m["reward/total"].tolist() == pytest.approx([2.04, -1.01], abs=1e-15)
    assert last_token_index(mask).tolist() == [2, 1]
    assert last_token_index(t64([[0, 1, 1], [1, 0, 0]])).tolist() == [2, 0]
    # PPO alone: the score only
    rew, _ = token_rewards(mask, score=score)
    assert rew.tolist() == [[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]


def test_token_rewards_refuse_bad_scores():
    mask = t64([[1, 1], [1, 0]])
    with pytest.raises(ValueError, match="NaN"):
        token_rewards(mask, score=t64([1.0, NAN]))
    with pytest.raises(ValueError, match="one reward per response"):
        token_rewards(mask, score=t64([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(mask, kl=t64([[0.0, 0.0], [0.0, 0.0]]), kl_coef=-0.1)


# ------------------------------------------------------------------------------ GAE
def test_gae_by_hand_gamma_1_lam_095_rows_of_different_lengths():
    rewards = t64([[0.0, 0.1, 1.0], [0.5, 2.0, 99.0]])
    values = t64([[0.5, 0.4, 0.3], [0.2, -0.1, NAN]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: delta = (0 + 0.4 - 0.5, 0.1 + 0.3 - 0.4, 1.0 + 0 - 0.3) = (-0.1, 0.0, 0.7)
    #        A_3 = 0.7, A_2 = 0 + 0.95 * 0.7 = 0.665, A_1 = -0.1 + 0.95 * 0.665 = 0.53175
    assert adv[0].tolist() == pytest.approx([0.53175, 0.665, 0.7], abs=1e-14)
    assert ret[0].tolist() == pytest.approx([1.03175, 1.065, 1.0], abs=1e-14)
    # row 1 (V_3 = 0: the episode ends at token 2): delta = (0.5 - 0.1 - 0.2, 2.0 + 0 + 0.1) = (0.2, 2.1)
    #        A_2 = 2.1, A_1 = 0.2 + 0.95 * 2.1 = 2.195
    assert adv[1].tolist() == pytest.approx([2.195, 2.1, 0.0], abs=1e-14)
    assert ret[1].tolist() == pytest.approx([2.395, 2.0, 0.0], abs=1e-14)


def test_gae_gamma_09_lam_1_gives_discounted_reward_to_go():
    rewards, values, mask = t64([[0.0, 0.1, 1.0]]), t64([[0.5, 0.4, 0.3]]), t64([[1, 1, 1]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=1.0)
    # delta = (0.9*0.4 - 0.5, 0.1 + 0.9*0.3 - 0.4, 0.7) = (-0.14, -0.03, 0.7)
    # A = (-0.14 + 0.9*0.6, -0.03 + 0.9*0.7, 0.7) = (0.4, 0.6, 0.7)
    assert adv[0].tolist() == pytest.approx([0.4, 0.6, 0.7], abs=1e-14)
    # returns = sum_i 0.9^i rew_{t+i}: (0.9 * 1.0, 0.1 + 0.9, 1.0)
    assert ret[0].tolist() == pytest.approx([0.9, 1.0, 1.0], abs=1e-14)


def test_gae_left_padded_row_equals_the_right_padded_one():
    rewards, values, mask = t64([[7.0, 0.5, 2.0]]), t64([[7.0, 0.2, -0.1]]), t64([[0, 1, 1]])
    adv_l, ret_l = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    assert adv_l[0].tolist() == pytest.approx([0.0, 2.195, 2.1], abs=1e-14)
    assert ret_l[0].tolist() == pytest.approx([0.0, 2.395, 2.0], abs=1e-14)


def test_gae_refuses_broken_masks_and_ranges():
    with pytest.raises(ValueError, match="contiguous"):
        gae_advantages(t64([[0.0, 0.0, 0.0]]), t64([[0.0, 0.0, 0.0]]), t64([[1, 0, 1]]))
    with pytest.raises(ValueError, match="no response token"):
        gae_advantages(t64([[0.0, 0.0]]), t64([[0.0, 0.0]]), t64([[0, 0]]))
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(t64([[0.0]]), t64([[0.0]]), t64([[1]]), lam=1.5)
    with pytest.raises(ValueError, match="values contains NaN"):
        gae_advantages(t64([[0.0]]), t64([[NAN]]), t64([[1]]))


# ------------------------------------------------------------------------------ whitening
def test_masked_whiten_by_hand():
    x, mask = t64([[1.0, 2.0, 3.0], [5.0, 100.0, NAN]]), t64([[1, 1, 1], [1, 0, 0]])
    # tokens {1, 2, 3, 5}: mean 11/4, deviations (-1.75, -0.75, 0.25, 2.25), squares sum 8.75,
    # Bessel-corrected variance 8.75 / 3 (TRL's masked_whiten)
    std = math.sqrt(8.75 / 3 + 1e-8)
    got = masked_whiten(x, mask)
    assert got[0].tolist() == pytest.approx([-1.75 / std, -0.75 / std, 0.25 / std], abs=1e-14)
    assert got[1].tolist() == pytest.approx([2.25 / std, 0.0, 0.0], abs=1e-14)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx(-1.75 / std + 2.75, abs=1e-14)
    assert kept[1, 1].item() == 0.0
    with pytest.raises(ValueError, match="two response tokens"):
        masked_whiten(t64([[1.0, 2.0]]), t64([[1, 0]]))
