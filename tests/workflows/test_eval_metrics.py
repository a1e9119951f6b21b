"""aligndistil.workflows.eval_metrics on hand-made cases (every expected value worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil.workflows.eval_metrics import (
    distinct_n,
    implicit_rewards,
    mean_ci95,
    reward_accuracy,
    sequence_kl_mc,
    sequence_kl_tokenwise,
)


def test_mean_ci95_formula():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    # sample sd = sqrt(5/3); half = 1.96 * sd / sqrt(4)
    assert half == pytest.approx(1.959963984540054 * math.sqrt(5 / 3) / 2)
    assert mean_ci95([3.0, 3.0, 3.0]) == (3.0, 0.0)
    m, h = mean_ci95([0.7])
    assert m == 0.7 and math.isnan(h)
    with pytest.raises(ValueError):
        mean_ci95([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci95([1.0, float("nan")])


def test_distinct_n_hand_made():
    # bigrams: (a,b) (b,c) | (a,b) (b,d) -> 3 unique of 4
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(0.75)
    # n-grams do not cross texts: "c" + "a" is not a bigram
    assert distinct_n(["a b c", "a"], 2) == pytest.approx(1.0)
    assert distinct_n(["x x x x"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a b a"], 1) == pytest.approx(2 / 3)
    assert distinct_n(["one", ""], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a b"], 0)


def test_reward_accuracy_known_answers():
    assert reward_accuracy([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 1.0
    assert reward_accuracy([0.0, 1.0], [1.0, 2.0]) == 0.0
    # a win, a loss and a tie (half)
    assert reward_accuracy([1.0, 2.0, 3.0], [0.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert reward_accuracy([5.0] * 4, [5.0] * 4) == 0.5  # a constant reward is at chance
    with pytest.raises(ValueError):
        reward_accuracy([1.0], [])


def test_implicit_rewards():
    assert implicit_rewards([-1.0, -2.0], [-3.0, -2.0], 0.1) == pytest.approx([0.2, 0.0])
    with pytest.raises(ValueError):
        implicit_rewards([1.0], [1.0, 2.0], 0.1)


def test_sequence_kl_mc_hand_made():
    lp_self = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    lp_other = torch.tensor([[-2.0, -2.5, -9.0], [-1.0, -0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = sequence_kl_mc(lp_self, lp_other, mask)
    assert out.tolist() == pytest.approx([1.0 + 0.5, 0.5 - 0.4])  # masked position ignored
    assert sequence_kl_mc(lp_self, lp_self, mask).tolist() == [0.0, 0.0]


def test_sequence_kl_tokenwise_hand_made():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    logits_self = torch.stack([p, p])[None]  # (1, 2, 2)
    logits_other = torch.stack([q, p])[None]
    mask = torch.tensor([[1.0, 1.0]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # second position: KL(p||p) = 0
    assert sequence_kl_tokenwise(logits_self, logits_other, mask).item() == pytest.approx(expected, rel=1e-5)
    assert sequence_kl_tokenwise(logits_self, logits_self, mask).item() == pytest.approx(0.0, abs=1e-7)
