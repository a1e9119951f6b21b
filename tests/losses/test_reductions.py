"""Global-count reductions stay exact under gradient accumulation and simulated DDP (docs/math.md, Normalisation)."""

from __future__ import annotations

import pytest
import torch

from aligndistil.losses.ops import token_kl
from aligndistil.losses import aligndistil_loss, sequence_mean, tdpo_loss, token_mean

F64 = torch.float64
B, T, V, D = 5, 4, 3, 4
LENGTHS = [1, 4, 2, 3, 4]


def t(x):
    return torch.tensor(x, dtype=F64)


# ----------------------------------------------------------------------------- hand values


def test_sequence_mean_hand_value():
    # (1 + 2 + 3) * world_size / N
    assert sequence_mean(t([1.0, 2.0, 3.0]), 6).item() == pytest.approx(1.0)
    assert sequence_mean(t([1.0, 2.0, 3.0]), 6, world_size=2).item() == pytest.approx(2.0)
    assert sequence_mean(t([1.0, 2.0, 3.0]), torch.tensor(4.0)).item() == pytest.approx(1.5)


def test_token_mean_hand_value():
    # masked sum (1 + 3 + 4) = 8 ; * world_size 3 / num_tokens 6 = 4
    got = token_mean(t([[1.0, 2.0], [3.0, 4.0]]), t([[1.0, 0.0], [1.0, 1.0]]), num_tokens=6, world_size=3)
    assert got.item() == pytest.approx(4.0)


def test_bad_normalisers():
    with pytest.raises(ValueError, match="num_sequences"):
        sequence_mean(t([1.0]), 0)
    with pytest.raises(ValueError, match="num_tokens"):
        token_mean(t([[1.0]]), t([[1.0]]), -1)
    with pytest.raises(ValueError, match="losses"):
        sequence_mean(t([[1.0]]), 1)
    with pytest.raises(ValueError, match="per_token"):
        token_mean(t([[1.0, 2.0]]), t([[1.0]]), 1)


# ------------------------------------------------------- accumulation / data parallelism


class Setup:
    """A linear "LM head" over fixed features, so there is a real parameter gradient."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Linear(D, V).double()
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(V, D, generator=g, dtype=F64))
            self.model.bias.copy_(torch.randn(V, generator=g, dtype=F64))
        self.mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(F64)
        # AlignDistil data
        self.feats = torch.randn(B, T, D, generator=g, dtype=F64)
        self.teacher = torch.randn(B, T, V, generator=g, dtype=F64)
        self.alpha = 0.05 + torch.rand(B, T, generator=g, dtype=F64)
        # TDPO data (rejected responses share the lengths reversed)
        self.feats_r = torch.randn(B, T, D, generator=g, dtype=F64)
        self.ref_c = torch.randn(B, T, V, generator=g, dtype=F64)
        self.ref_r = torch.randn(B, T, V, generator=g, dtype=F64)
        self.lab_c = torch.randint(0, V, (B, T), generator=g)
        self.lab_r = torch.randint(0, V, (B, T), generator=g)
        self.mask_r = self.mask.flip(0)

    def seq_losses(self, kind, idx):
        if kind == "aligndistil":
            return aligndistil_loss(self.model(self.feats[idx]), self.teacher[idx], self.mask[idx],
                                    alpha=self.alpha[idx], beta0=0.1)[0]
        return tdpo_loss(self.model(self.feats[idx]), self.model(self.feats_r[idx]), self.ref_c[idx],
                         self.ref_r[idx], self.lab_c[idx], self.lab_r[idx], self.mask[idx], self.mask_r[idx],
                         variant=1, beta=0.5)[0]

    def token_losses(self, idx):
        return token_kl(self.model(self.feats[idx]), self.teacher[idx]), self.mask[idx]

    def grad(self, steps):
        """Run ``steps`` (callables returning a scalar each) with accumulation; return the grads."""
        self.model.zero_grad(set_to_none=True)
        for step in steps:
            step().backward()
        return torch.cat([p.grad.flatten().clone() for p in self.model.parameters()])


ALL = list(range(B))
MICRO = [[0, 1], [2, 3, 4]]       # unequal micro-batch sizes
RANKS = [[0], [1, 2, 3, 4]]       # unequal per-rank batches


@pytest.mark.parametrize("kind", ["aligndistil", "tdpo"])
def test_sequence_mean_gradient_accumulation(kind):
    s = Setup()
    full = s.grad([lambda: sequence_mean(s.seq_losses(kind, ALL), B)])
    accum = s.grad([lambda mb=mb: sequence_mean(s.seq_losses(kind, mb), B) for mb in MICRO])
    torch.testing.assert_close(accum, full, rtol=1e-12, atol=1e-14)
    # the naive per-micro-batch mean (averaged over the 2 steps) is a different gradient
    naive = s.grad([lambda mb=mb: s.seq_losses(kind, mb).mean() / len(MICRO) for mb in MICRO])
    assert (naive - full).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["aligndistil", "tdpo"])
def test_sequence_mean_simulated_ddp(kind):
    s = Setup()
    full = s.grad([lambda: sequence_mean(s.seq_losses(kind, ALL), B)])
    # each rank: its own backward with world_size = 2; DDP then AVERAGES the ranks' grads
    per_rank = [s.grad([lambda r=r: sequence_mean(s.seq_losses(kind, r), B, world_size=2)]) for r in RANKS]
    torch.testing.assert_close(sum(per_rank) / 2, full, rtol=1e-12, atol=1e-14)
    naive = [s.grad([lambda r=r: s.seq_losses(kind, r).mean()]) for r in RANKS]
    assert (sum(naive) / 2 - full).abs().max() > 1e-4
    # ranks x micro-batches together: rank 0 = [[0], [1]], rank 1 = [[2, 3], [4]]
    combo = [s.grad([lambda mb=mb: sequence_mean(s.seq_losses(kind, mb), B, world_size=2) for mb in rank])
             for rank in ([[0], [1]], [[2, 3], [4]])]
    torch.testing.assert_close(sum(combo) / 2, full, rtol=1e-12, atol=1e-14)


def test_token_mean_gradient_accumulation_and_ddp():
    s = Setup()
    n_tok = sum(LENGTHS)

    def step(idx, world_size=1):
        kl, m = s.token_losses(idx)
        return token_mean(kl, m, n_tok, world_size=world_size)

    full = s.grad([lambda: step(ALL)])
    # the full-batch value is the token average of the per-token KL
    kl, m = s.token_losses(ALL)
    assert step(ALL).item() == pytest.approx(((kl * m).sum() / m.sum()).item(), abs=1e-14)
    # equal-SIZE micro-batches, unequal token counts (1+4 = 5, 2+3 = 5, 4)
    micro = [[0, 1], [2, 3], [4]]
    accum = s.grad([lambda mb=mb: step(mb) for mb in micro])
    torch.testing.assert_close(accum, full, rtol=1e-12, atol=1e-14)

    def naive_step(idx):
        kl, m = s.token_losses(idx)
        return (kl * m).sum() / m.sum() / len(micro)

    naive = s.grad([lambda mb=mb: naive_step(mb) for mb in micro])
    assert (naive - full).abs().max() > 1e-4
    per_rank = [s.grad([lambda r=r: step(r, world_size=2)]) for r in RANKS]
    torch.testing.assert_close(sum(per_rank) / 2, full, rtol=1e-12, atol=1e-14)
