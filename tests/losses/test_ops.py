"""The per-token operations of aligndistil.losses.ops, by hand values.

Label log-probs, token KL and TVD, the masked sequence sum, AlignDistil's adaptive
``alpha_t = r * TVD + eps`` and its teacher logits ``base + alpha (base - negative)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil.losses.ops import alpha_from_tvd, label_logps, sequence_sum, teacher_logits, token_kl, token_tvd

F64 = torch.float64


def test_label_logps_token_kl_hand_values():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]], dtype=F64)  # (1/4, 3/4), (2/3, 1/3)
    labels = torch.tensor([[1, 1]])
    assert label_logps(logits, labels)[0].tolist() == pytest.approx([math.log(3 / 4), math.log(1 / 3)], abs=1e-15)
    uniform = torch.zeros_like(logits)
    # KL((1/4, 3/4) || (1/2, 1/2)) = 1/4 log(1/2) + 3/4 log(3/2)
    kl = token_kl(logits, uniform)
    assert kl[0, 0].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-15)
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 log 2 + 1/2 log(2/3): the first argument is p
    assert token_kl(uniform, logits)[0, 0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-15)
    # TVD((2/3, 1/3), (1/2, 1/2)) = 1/2 (1/6 + 1/6) = 1/6
    assert token_tvd(logits, uniform)[0, 1].item() == pytest.approx(1 / 6, abs=1e-15)
    assert sequence_sum(kl, torch.tensor([[1.0, 0.0]], dtype=F64)).item() == pytest.approx(kl[0, 0].item())


def test_token_tvd_of_half_precision_logits_is_computed_in_fp32():
    """bf16 logits are upcast before the softmax difference; the result keeps the input dtype."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 50, generator=g).to(torch.bfloat16) for _ in range(2))
    got = token_tvd(a, b)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, token_tvd(a.float(), b.float()).to(torch.bfloat16))


def test_alpha_from_tvd_hand_values():
    # alpha_t = r * TVD_t + eps with r = 10, eps = 1e-3: TVD 0 -> eps, 1/4 -> 2.501, 1 -> r + eps
    tvd = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    assert alpha_from_tvd(tvd, 10.0, 1e-3).tolist() == pytest.approx([0.001, 2.501, 10.001], abs=1e-15)


def test_teacher_logits_hand_values():
    base = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], dtype=F64)
    neg = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]], dtype=F64)
    # a float alpha = 2: token 0 = (1, 0, 0) + 2 (1, -1, 0) = (3, -2, 0); token 1 = (0, 2, 0) + 2 (0, 2, -2) = (0, 6, -4)
    torch.testing.assert_close(teacher_logits(base, neg, 2.0),
                               torch.tensor([[[3.0, -2.0, 0.0], [0.0, 6.0, -4.0]]], dtype=F64), rtol=0, atol=0)
    # a per-token alpha (0.5, 2): token 0 = (1, 0, 0) + 0.5 (1, -1, 0) = (1.5, -0.5, 0); token 1 as above
    alpha = torch.tensor([[0.5, 2.0]], dtype=F64)
    torch.testing.assert_close(teacher_logits(base, neg, alpha),
                               torch.tensor([[[1.5, -0.5, 0.0], [0.0, 6.0, -4.0]]], dtype=F64), rtol=0, atol=0)
