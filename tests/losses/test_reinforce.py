"""REINFORCE of AlignDistil App. E (Eq. 42, 43), exactly, on a tabular policy with every sequence enumerated.

As the Theorem-1 test: vocabulary 3, a fixed response length T (2 or 3), no EOS; each model
is a table of logits indexed by the prefix ``y_<t``, and all ``3^T`` responses are listed.
An estimator's EXPECTED gradient is then a finite sum, ``sum_y pi_theta(y) grad L(y)`` (the
weights ``pi_theta(y)`` detached: they are the sampling distribution, not part of the
loss), and it can be compared with the autograd gradient of the objective it claims, in
float64, to 1e-10. With one length ``T`` the ``1/|y|`` of both equations is the constant
``1/T``.

What is shown:
- Eq. 42 in the implemented form (detached log-ratio weight) has expected gradient
  ``grad J / T``, ``J = E[r_ctr - beta log pi_theta(y|x)/pi_dpo(y|x)]``;
- Eq. 42 as printed (the log-ratio differentiated pathwise) has a KL term of zero expected
  gradient (the trap);
- Eq. 43's expected gradient is ``(grad E[sum_t r_t] - beta E[sum_t grad KL_t]) / T`` with the
  states held fixed; it differs from the full gradient of
  ``E[sum_t r_t - beta sum_t KL_t]`` (= Eq. 42's ``J``, by the chain rule of KL) by exactly
  the state-distribution term ``beta E[sum_t (sum_{j>t} KL_j) grad log pi_theta(y_t|s_t)] / T``;
- the leave-one-out baseline keeps the expectation, the batch mean does not.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from aligndistil.losses.ops import label_logps, token_kl
from aligndistil.losses.reinforce import (
    reward_to_go,
    sequence_baseline,
    sequence_reinforce_loss,
    sequence_reinforce_loss_from_stats,
    token_reinforce_loss,
    token_reinforce_loss_from_stats,
)

F64 = torch.float64
V = 3
BETA0, BETA = 0.1, 0.08


def close(t: torch.Tensor, rows, atol: float) -> None:
    torch.testing.assert_close(t, torch.tensor(rows, dtype=t.dtype), rtol=0, atol=atol)


class Tabular:
    """Every response of length T over V tokens, and the prefix (state) of each position."""

    def __init__(self, T: int):
        self.T = T
        prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
        index = {p: i for i, p in enumerate(prefixes)}
        self.seqs = list(itertools.product(range(V), repeat=T))
        self.n_prefixes = len(prefixes)
        self.states = torch.tensor([[index[y[:t]] for t in range(T)] for y in self.seqs])  # (N, T)
        self.labels = torch.tensor(self.seqs)  # (N, T)
        self.mask = torch.ones(len(self.seqs), T, dtype=F64)

    def table(self, seed: int, grad: bool = False, scale: float = 1.5) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(self.n_prefixes, V, generator=g, dtype=F64) * scale).requires_grad_(grad)

    def logits(self, table: torch.Tensor) -> torch.Tensor:
        """(N, T, V): row t of sequence y holds the logits at s_t = y_<t (already aligned)."""
        return table[self.states]

    def token_logps(self, table: torch.Tensor) -> torch.Tensor:
        return label_logps(self.logits(table), self.labels)


def expected_grad(losses: torch.Tensor, probs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum_y pi(y) grad(-L(y)): the expected ascent direction of an estimator."""
    (g,) = torch.autograd.grad(-(probs.detach() * losses).sum(), theta)
    return g


def grad_of(objective: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(objective, theta)
    return g


def models(tab: Tabular, seed: int):
    return tab.table(10 * seed + 1, grad=True), tab.table(10 * seed + 2), tab.table(10 * seed + 3)


# ------------------------------------------------------------------------------ Eq. 42
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_eq42_expected_gradient_is_the_gradient_of_the_kl_penalised_objective(T, seed):
    tab = Tabular(T)
    theta, dpo, rev = models(tab, seed)
    losses, metrics = sequence_reinforce_loss(tab.logits(theta), tab.logits(dpo), tab.logits(rev), tab.labels, tab.mask,
                                              beta0=BETA0, beta=BETA)
    logp = tab.token_logps(theta).sum(-1)
    probs = logp.exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    g_est = expected_grad(losses, probs, theta)

    # J = E[r_ctr - beta log pi_theta(y)/pi_dpo(y)], computed afresh from the tables
    logp = tab.token_logps(theta).sum(-1)
    dpo_lp, rev_lp = tab.token_logps(dpo).sum(-1), tab.token_logps(rev).sum(-1)
    J = (logp.exp() * (BETA0 * (dpo_lp - rev_lp) - BETA * (logp - dpo_lp))).sum()
    g_J = grad_of(J, theta)
    assert g_J.abs().max() > 1e-3
    assert (g_est - g_J / T).abs().max() < 1e-10
    torch.testing.assert_close(metrics["reward/contrastive"], BETA0 * (dpo_lp - rev_lp).detach(), rtol=0, atol=1e-14)


def test_eq42_as_printed_has_a_kl_term_of_zero_expected_gradient():
    """The trap: -beta grad log pi_theta(y)/pi_dpo(y) taken pathwise averages to 0 under y ~ pi_theta.

    So Eq. 42 read literally trains on the reward alone. The implemented form (the log-ratio as
    a detached weight) recovers -beta grad KL(pi_theta(y) || pi_dpo(y)) / T.
    """
    tab = Tabular(3)
    theta, dpo, _ = models(tab, 2)
    probs = tab.token_logps(theta).sum(-1).exp().detach()
    # the printed KL term, pathwise: (1/T) * -beta (log pi_theta(y) - log pi_dpo(y))
    printed = -(-BETA * (tab.token_logps(theta).sum(-1) - tab.token_logps(dpo).sum(-1).detach())) / tab.T
    g_printed = expected_grad(printed, probs, theta)
    assert g_printed.abs().max() < 1e-14
    # the implemented form with a zero reward (rev = dpo makes r_ctr = 0): the KL gradient itself
    losses, _ = sequence_reinforce_loss(tab.logits(theta), tab.logits(dpo), tab.logits(dpo), tab.labels, tab.mask,
                                        beta0=BETA0, beta=BETA)
    g_impl = expected_grad(losses, probs, theta)
    logp, dpo_lp = tab.token_logps(theta).sum(-1), tab.token_logps(dpo).sum(-1)
    g_kl = grad_of((logp.exp() * (logp - dpo_lp)).sum(), theta)  # grad KL(pi_theta(y) || pi_dpo(y))
    assert g_kl.abs().max() > 1e-2
    assert (g_impl - (-BETA * g_kl / tab.T)).abs().max() < 1e-10


# ------------------------------------------------------------------------------ Eq. 43
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_eq43_expected_gradient_is_reward_to_go_plus_the_pathwise_kl_only(T, seed):
    tab = Tabular(T)
    theta, dpo, rev = models(tab, seed)
    losses, metrics = token_reinforce_loss(tab.logits(theta), tab.logits(dpo), tab.logits(rev), tab.labels, tab.mask,
                                           beta0=BETA0, beta=BETA)
    probs = tab.token_logps(theta).sum(-1).exp()
    g_est = expected_grad(losses, probs, theta)

    r_seq = (BETA0 * (tab.token_logps(dpo) - tab.token_logps(rev))).sum(-1).detach()  # sum_t r_t

    def pieces():
        lp = tab.token_logps(theta)
        kl = token_kl(tab.logits(theta), tab.logits(dpo).detach())  # (N, T) KL(pi_theta || pi_dpo) at s_t
        return lp, lp.sum(-1).exp(), kl

    lp, p, kl = pieces()
    g_reward = grad_of((p * r_seq).sum(), theta)                                   # grad E[sum_t r_t]
    lp, p, kl = pieces()
    g_path = grad_of((p.detach() * kl.sum(-1)).sum(), theta)                       # states held fixed
    lp, p, kl = pieces()
    g_full_kl = grad_of((p * kl.sum(-1)).sum(), theta)                             # grad E[sum_t KL_t]
    lp, p, kl = pieces()
    kl_after = (kl.detach().flip(-1).cumsum(-1).flip(-1) - kl.detach())            # sum_{j>t} KL_j
    g_state = grad_of((p.detach() * (kl_after * lp).sum(-1)).sum(), theta)         # E[sum_t KL_>t grad log pi(y_t|s_t)]

    # 1. what Eq. 43 follows: reward to go plus the pathwise (state-frozen) KL gradient
    assert (g_est - (g_reward - BETA * g_path) / T).abs().max() < 1e-10
    # 2. the full gradient of E[sum_t r_t - beta sum_t KL_t] has the extra state-distribution term
    g_full = (g_reward - BETA * g_full_kl) / T
    difference = g_est - g_full
    assert (difference - BETA * g_state / T).abs().max() < 1e-10
    assert difference.norm() > 1e-4 and g_state.norm() > 1e-3
    # 3. that full objective is Eq. 42's J: E[sum_t KL_t] = KL(pi_theta(y) || pi_dpo(y)) (chain rule)
    logp, dpo_lp = tab.token_logps(theta).sum(-1), tab.token_logps(dpo).sum(-1)
    seq_kl = (logp.exp() * (logp - dpo_lp)).sum()
    assert (p.detach() * kl.detach().sum(-1)).sum().item() == pytest.approx(seq_kl.item(), abs=1e-12)
    torch.testing.assert_close(metrics["reward/contrastive"], r_seq, rtol=0, atol=1e-14)


def test_eq43_distance_to_the_full_gradient_is_reported():
    """How far Eq. 43's expectation is from the full gradient, relative to its size (seed 0, T = 3)."""
    tab = Tabular(3)
    theta, dpo, rev = models(tab, 0)
    losses, _ = token_reinforce_loss(tab.logits(theta), tab.logits(dpo), tab.logits(rev), tab.labels, tab.mask,
                                     beta0=BETA0, beta=BETA)
    g_est = expected_grad(losses, tab.token_logps(theta).sum(-1).exp(), theta)
    lp = tab.token_logps(theta)
    kl = token_kl(tab.logits(theta), tab.logits(dpo).detach())
    r_seq = (BETA0 * (tab.token_logps(dpo) - tab.token_logps(rev))).sum(-1).detach()
    p = lp.sum(-1).exp()
    g_full = grad_of((p * (r_seq - BETA * kl.sum(-1))).sum(), theta) / tab.T
    relative = ((g_est - g_full).norm() / g_full.norm()).item()
    # Measured here: 0.095, the dropped state-distribution term is ~9% of the full gradient's norm
    # (0.05 to 0.38 over seeds 0-3 at T = 2 and 3; cosine to the full gradient 0.93 to 0.9997).
    assert 0.01 < relative < 0.5, relative


# ------------------------------------------------------------------------------ baselines
def _pairs_expected_grad(tab, theta, dpo, rev, fn, baseline):
    """E over two independent responses of the pair's mean gradient, each pair one group."""
    idx = torch.tensor(list(itertools.product(range(len(tab.seqs)), repeat=2)))  # (N^2, 2)
    rows = idx.flatten()
    groups = torch.arange(idx.shape[0]).repeat_interleave(2)
    logits = tab.logits(theta)[rows]
    losses, _ = fn(logits, tab.logits(dpo)[rows], tab.logits(rev)[rows], tab.labels[rows], tab.mask[rows],
                   beta0=BETA0, beta=BETA, baseline=baseline, groups=groups)
    seq_p = tab.token_logps(theta).sum(-1).exp().detach()
    pair_p = (seq_p[idx[:, 0]] * seq_p[idx[:, 1]]).repeat_interleave(2)
    return expected_grad(losses / 2, pair_p, theta)


@pytest.mark.parametrize("fn", [sequence_reinforce_loss, token_reinforce_loss])
def test_leave_one_out_keeps_the_expected_gradient_and_the_batch_mean_does_not(fn):
    tab = Tabular(2)
    theta, dpo, rev = models(tab, 3)
    plain = _pairs_expected_grad(tab, theta, dpo, rev, fn, None)
    single, _ = fn(tab.logits(theta), tab.logits(dpo), tab.logits(rev), tab.labels, tab.mask, beta0=BETA0, beta=BETA)
    assert (plain - expected_grad(single, tab.token_logps(theta).sum(-1).exp(), theta)).abs().max() < 1e-12
    loo = _pairs_expected_grad(tab, theta, dpo, rev, fn, "loo")
    assert (loo - plain).abs().max() < 1e-12
    # With two rows the mean baseline is (w_1 + w_2)/2, so row 1's weight is (w_1 - w_2)/2: the
    # w_2 half averages out and Eq. 42's expected gradient is exactly halved (biased). Eq. 43 keeps
    # its KL term whole, so there it is only moved.
    mean = _pairs_expected_grad(tab, theta, dpo, rev, fn, "mean")
    assert (mean - plain).abs().max() > 1e-4
    if fn is sequence_reinforce_loss:
        assert (mean - plain / 2).abs().max() < 1e-12


def test_sequence_baseline_and_reward_to_go_by_hand():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=F64)
    groups = torch.tensor([0, 0, 1, 1])
    assert sequence_baseline(v, "mean", groups).tolist() == [1.5, 1.5, 4.5, 4.5]
    assert sequence_baseline(v, "loo", groups).tolist() == [2.0, 1.0, 6.0, 3.0]
    # one group of four: (12 - v_i) / 3
    assert sequence_baseline(v, "loo").tolist() == pytest.approx([11 / 3, 10 / 3, 3.0, 2.0], abs=1e-15)
    assert sequence_baseline(v, None).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="two rows per group"):
        sequence_baseline(v, "loo", torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="baseline"):
        sequence_baseline(v, "median")
    r = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    assert reward_to_go(r, mask).tolist() == [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]]


# ------------------------------------------------------------------------------ by hand
def test_sentence_and_token_losses_by_hand():
    mask = torch.ones(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64, requires_grad=True)
    dpo, rev = torch.tensor([[-1.0, -2.0]], dtype=F64), torch.tensor([[-2.0, -2.0]], dtype=F64)
    # r_ctr = 0.1 * ((-1 + 2) + (-2 + 2)) = 0.1; log pi_theta(y)/pi_dpo(y) = log(1/8) + 3
    w = 0.1 - 0.08 * (math.log(0.125) + 3.0)
    losses, m = sequence_reinforce_loss_from_stats(logp, dpo, rev, mask, beta0=0.1, beta=0.08)
    assert losses.item() == pytest.approx(-w * math.log(0.125) / 2, abs=1e-15)
    (g,) = torch.autograd.grad(losses.sum(), logp)
    close(g, [[-w / 2, -w / 2]], 1e-15)
    assert m["reward/contrastive_per_token"].item() == pytest.approx(0.05, abs=1e-15)
    # Eq. 43: r = (0.1, 0), G = (0.1, 0); KL = (0.3, 0.2)
    kl = torch.tensor([[0.3, 0.2]], dtype=F64, requires_grad=True)
    losses, m = token_reinforce_loss_from_stats(logp, dpo, rev, kl, mask, beta0=0.1, beta=0.08)
    assert losses.item() == pytest.approx((-0.1 * math.log(0.5) + 0.08 * 0.5) / 2, abs=1e-15)
    g_logp, g_kl = torch.autograd.grad(losses.sum(), (logp, kl))
    close(g_logp, [[-0.05, 0.0]], 1e-15)
    close(g_kl, [[0.04, 0.04]], 1e-15)
    assert m["kl/dpo"].item() == pytest.approx(0.5, abs=1e-15)


def test_padding_sends_no_gradient_and_bad_input_is_refused():
    mask = torch.tensor([[1, 1, 0]], dtype=F64)
    nan = float("nan")
    logp = torch.tensor([[-1.0, -2.0, nan]], dtype=F64, requires_grad=True)
    dpo, rev = torch.tensor([[-1.0, -1.0, nan]], dtype=F64), torch.tensor([[-2.0, -2.0, 5.0]], dtype=F64)
    kl = torch.tensor([[0.1, 0.2, nan]], dtype=F64, requires_grad=True)
    for losses, _ in (sequence_reinforce_loss_from_stats(logp, dpo, rev, mask),
                      token_reinforce_loss_from_stats(logp, dpo, rev, kl, mask)):
        assert torch.isfinite(losses).all()
        g = torch.autograd.grad(losses.sum(), logp)[0]
        assert torch.isfinite(g).all() and g[0, 2].item() == 0.0
    with pytest.raises(ValueError, match="beta"):
        sequence_reinforce_loss_from_stats(logp, dpo, rev, mask, beta=0.0)
    with pytest.raises(ValueError, match="dpo_kl has shape"):
        token_reinforce_loss_from_stats(logp, dpo, rev, kl[:, :2], mask)
    with pytest.raises(ValueError, match="dpo_logps contains NaN"):
        sequence_reinforce_loss_from_stats(logp, torch.full_like(dpo, nan), rev, mask)
