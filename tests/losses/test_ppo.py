"""PPO's clipped policy and value losses (aligndistil.losses.ppo) on two-token examples worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil.losses.ppo import ppo_policy_loss, ppo_value_loss
from aligndistil.losses.reductions import sequence_mean

F64 = torch.float64
NAN = float("nan")


def close(t: torch.Tensor, rows, atol: float) -> None:
    torch.testing.assert_close(t, torch.tensor(rows, dtype=t.dtype), rtol=0, atol=atol)


def t64(rows, grad=False):
    return torch.tensor(rows, dtype=F64, requires_grad=grad)


def test_policy_loss_two_tokens_by_hand():
    # row 0: ratios (1.5, 0.5), advantages (+1, +2), eps = 0.2
    #   token 1: max(-1.5, -1.2) = -1.2 -> clipped branch, no gradient
    #   token 2: max(-1.0, -1.6) = -1.0 -> unclipped, d/d logp = -A * rho = -1.0
    # row 1: ratios (0.5, 1.5), advantages (-1, -1)
    #   token 1: max(0.5, 0.8) = 0.8 -> clipped, no gradient
    #   token 2: max(1.5, 1.2) = 1.5 -> unclipped, d/d logp = -A * rho = 1.5
    # row 2: one token (ratio 1, A = 3) and NaN padding: loss -3, gradient -3
    logps = t64([[math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5)], [0.0, NAN]], grad=True)
    old = t64([[0.0, 0.0], [0.0, 0.0], [0.0, NAN]])
    adv = t64([[1.0, 2.0], [-1.0, -1.0], [3.0, NAN]])
    mask = t64([[1, 1], [1, 1], [1, 0]])
    losses, m = ppo_policy_loss(logps, old, adv, mask, cliprange=0.2)
    assert losses.tolist() == pytest.approx([-2.2, 2.3, -3.0], abs=1e-14)
    (g,) = torch.autograd.grad(losses.sum(), logps)
    close(g, [[0.0, -1.0], [0.0, 1.5], [-3.0, 0.0]], 1e-14)
    assert m["policy/clipfrac"].tolist() == [0.5, 0.5, 0.0]
    half_sq = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert m["policy/approx_kl"].tolist() == pytest.approx([half_sq, half_sq, 0.0], abs=1e-15)
    assert m["policy/ratio"].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-15)
    # per-sequence means instead of sums
    seq, _ = ppo_policy_loss(logps, old, adv, mask, cliprange=0.2, normalisation="sequence")
    assert seq.tolist() == pytest.approx([-1.1, 1.15, -3.0], abs=1e-14)


def test_token_normalisation_is_the_global_per_token_mean():
    """sum of row sums / global token count == mean of the 5 per-token losses (TRL, OpenRLHF)."""
    logps = t64([[math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5)], [0.0, 0.0]])
    adv = t64([[1.0, 2.0], [-1.0, -1.0], [3.0, 0.0]])
    mask = t64([[1, 1], [1, 1], [1, 0]])
    losses, _ = ppo_policy_loss(logps, torch.zeros_like(logps), adv, mask)
    per_token = [-1.2, -1.0, 0.8, 1.5, -3.0]
    assert sequence_mean(losses, 5).item() == pytest.approx(sum(per_token) / 5, abs=1e-14)


def test_value_loss_two_tokens_by_hand():
    # token 1: V = 1.0, V_old = 0.5, G = 2.0: clipped value 0.5 + 0.2 = 0.7,
    #   errors (1 - 2)^2 = 1 and (0.7 - 2)^2 = 1.69 -> 0.5 * 1.69 = 0.845, clipped (no gradient)
    # token 2: V = 1.0, V_old = 0.5, G = 0.0: errors 1 and 0.49 -> 0.5 * 1 = 0.5, unclipped,
    #   d/dV = V - G = 1.0
    values = t64([[1.0, 1.0]], grad=True)
    old, returns, mask = t64([[0.5, 0.5]]), t64([[2.0, 0.0]]), t64([[1, 1]])
    losses, m = ppo_value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert losses.tolist() == pytest.approx([1.345], abs=1e-14)
    (g,) = torch.autograd.grad(losses.sum(), values)
    close(g, [[0.0, 1.0]], 1e-14)
    assert m["value/clipfrac"].tolist() == [0.5]
    assert m["value/error"].tolist() == pytest.approx([1.0], abs=1e-15)
    # without clipping: 0.5 * (1 + 1), gradients V - G = (-1, 1)
    plain, m0 = ppo_value_loss(values, old, returns, mask, cliprange_value=None)
    assert plain.tolist() == pytest.approx([1.0], abs=1e-14)
    (g0,) = torch.autograd.grad(plain.sum(), values)
    close(g0, [[-1.0, 1.0]], 1e-14)
    assert m0["value/clipfrac"].tolist() == [0.0]


def test_value_loss_ignores_padding_and_refuses_bad_input():
    values = t64([[1.0, NAN]], grad=True)
    losses, _ = ppo_value_loss(values, t64([[1.0, NAN]]), t64([[0.0, NAN]]), t64([[1, 0]]))
    assert losses.tolist() == pytest.approx([0.5], abs=1e-15)
    (g,) = torch.autograd.grad(losses.sum(), values)
    assert g.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="returns contains NaN"):
        ppo_value_loss(t64([[1.0]]), t64([[1.0]]), t64([[NAN]]), t64([[1]]))
    with pytest.raises(ValueError, match="normalisation"):
        ppo_value_loss(t64([[1.0]]), t64([[1.0]]), t64([[1.0]]), t64([[1]]), normalisation="batch")
    with pytest.raises(ValueError, match="cliprange"):
        ppo_policy_loss(t64([[1.0]]), t64([[1.0]]), t64([[1.0]]), t64([[1]]), cliprange=0.0)
