"""Theorem 1 of AlignDistil, exactly, on a model small enough to enumerate (AlignDistil Sec. 3, Theorem 1).

A tabular "model": vocabulary 3, fixed response length 3, no EOS. Each model is a table
of logits indexed by the prefix ``y_<t`` (13 prefixes: (), 3 of length 1, 9 of length 2),
filled at random. All 27 responses are enumerated.

Left-hand side: the RLHF objective computed by plain enumeration in Python floats,
``J = sum_y pi_theta(y) * reward(y) - beta * KL(pi_theta(y) || anchor(y))`` with
sequence-level probabilities (products over tokens).

Right-hand side, with the package's teacher and ``token_kl``:
``-beta E_y sum_t KL(pi_theta(.|s_t) || pi*(.|s_t)) + beta E_y sum_t log Z*(s_t)``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from aligndistil.losses.ops import label_logps, token_kl
from aligndistil.losses import aligndistil_loss, aligndistil_teacher_logits, contrastive_alpha, vanilla_alpha

F64 = torch.float64
V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
SEQS = list(itertools.product(range(V), repeat=T))
assert len(PREFIXES) == 13 and len(SEQS) == 27


def random_table(seed: int, scale: float = 1.5) -> dict[tuple, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(V, generator=g, dtype=F64) * scale).tolist() for p in PREFIXES}


# ------------------------------------------------------------------ left side: enumeration


def log_softmax_list(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def seq_logprob(table, y) -> float:
    """log pi(y) = sum_t log pi(y_t | y_<t), by the chain rule over the table."""
    return sum(log_softmax_list(table[y[:t]])[y[t]] for t in range(T))


def rlhf_objective(theta, reward_pos, reward_neg, anchor, beta0, beta) -> float:
    """J = E_{y~pi_theta}[beta0 log pi_pos(y)/pi_neg(y)] - beta KL(pi_theta(y) || pi_anchor(y))."""
    probs = [math.exp(seq_logprob(theta, y)) for y in SEQS]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)
    reward = sum(p * beta0 * (seq_logprob(reward_pos, y) - seq_logprob(reward_neg, y)) for p, y in zip(probs, SEQS))
    kl = sum(p * (seq_logprob(theta, y) - seq_logprob(anchor, y)) for p, y in zip(probs, SEQS))
    return reward - beta * kl


# ------------------------------------------------------------- right side: package per state


def logits_along(table) -> torch.Tensor:
    """(27, T, V): row t of sequence y holds the logits at state s_t = y_<t (already aligned)."""
    return torch.tensor([[table[y[:t]] for t in range(T)] for y in SEQS], dtype=F64)


LABELS = torch.tensor(SEQS)
MASK = torch.ones(len(SEQS), T, dtype=F64)


def seq_probs(table) -> torch.Tensor:
    return label_logps(logits_along(table), LABELS).sum(-1).exp()


def rhs(theta, z_star, log_z, beta):
    """-beta E sum_t KL(pi_theta || pi*) + beta E sum_t log Z*, expectations over y ~ pi_theta."""
    w = seq_probs(theta)
    kl = token_kl(logits_along(theta), z_star)  # (27, T), student first
    return -beta * (w * kl.sum(-1)).sum() + beta * (w * log_z.sum(-1)).sum(), w, kl


def vanilla_parts(dpo, ref, beta0, beta):
    z_dpo, z_ref = logits_along(dpo), logits_along(ref)
    c = beta0 / beta
    z_star = aligndistil_teacher_logits(z_dpo, z_ref, vanilla_alpha(beta0, beta))
    log_z = z_star.logsumexp(-1) - c * z_dpo.logsumexp(-1) - (1 - c) * z_ref.logsumexp(-1)
    return z_star, log_z


def contrastive_parts(dpo, rev, beta0, beta):
    z_dpo, z_rev = logits_along(dpo), logits_along(rev)
    c = beta0 / beta
    z_star = aligndistil_teacher_logits(z_dpo, z_rev, contrastive_alpha(beta0, beta))
    log_z = z_star.logsumexp(-1) - (1 + c) * z_dpo.logsumexp(-1) + c * z_rev.logsumexp(-1)
    return z_star, log_z


@pytest.mark.parametrize("beta0, beta", [(0.1, 0.05), (0.1, 0.3), (0.1, 0.1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_vanilla_identity(beta0, beta, seed):
    theta, dpo, ref = random_table(10 * seed + 1), random_table(10 * seed + 2), random_table(10 * seed + 3)
    lhs = rlhf_objective(theta, dpo, ref, ref, beta0, beta)  # reward beta0 log dpo/ref, KL anchor ref
    z_star, log_z = vanilla_parts(dpo, ref, beta0, beta)
    right, w, kl = rhs(theta, z_star, log_z, beta)
    assert abs(lhs - right.item()) < 1e-10
    # The AlignDistil loss with alpha = beta0/beta (so beta_t = beta) is (1/|y|) sum_t beta KL:
    losses, _ = aligndistil_loss(logits_along(theta), z_star, MASK, alpha=beta0 / beta, beta0=beta0)
    torch.testing.assert_close((w * losses * T).sum(), beta * (w * kl.sum(-1)).sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta0, beta", [(0.1, 0.05), (0.1, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_contrastive_identity(beta0, beta, seed):
    theta, dpo, rev = random_table(10 * seed + 4), random_table(10 * seed + 5), random_table(10 * seed + 6)
    lhs = rlhf_objective(theta, dpo, rev, dpo, beta0, beta)  # reward beta0 log dpo/rev, KL anchor dpo
    z_star, log_z = contrastive_parts(dpo, rev, beta0, beta)
    right, _, _ = rhs(theta, z_star, log_z, beta)
    assert abs(lhs - right.item()) < 1e-10


def test_identity_fails_without_log_z_term():
    """The log Z* term is not negligible: dropping it breaks the identity (so the test can fail)."""
    theta, dpo, ref = random_table(1), random_table(2), random_table(3)
    lhs = rlhf_objective(theta, dpo, ref, ref, 0.1, 0.05)
    z_star, log_z = vanilla_parts(dpo, ref, 0.1, 0.05)
    right, _, _ = rhs(theta, z_star, torch.zeros_like(log_z), 0.05)
    assert abs(lhs - right.item()) > 1e-3


@pytest.mark.parametrize("kind", ["vanilla", "contrastive"])
def test_log_z_term_depends_on_theta(kind):
    """E_{y~pi_theta} sum_t log Z*(s_t) is NOT constant in theta (the paper calls it constant).

    log Z*(s) depends only on the teachers, but which states are visited depends on theta.
    """
    dpo, other = random_table(22), random_table(23)
    parts = vanilla_parts if kind == "vanilla" else contrastive_parts
    _, log_z = parts(dpo, other, 0.1, 0.05)
    values = []
    for seed in (24, 25):
        w = seq_probs(random_table(seed))
        values.append((w * log_z.sum(-1)).sum().item())
    assert abs(values[0] - values[1]) > 1e-3
    # and its gradient w.r.t. the policy table is nonzero
    theta_logits = logits_along(random_table(24)).requires_grad_(True)
    w = label_logps(theta_logits, LABELS).sum(-1).exp()
    g = torch.autograd.grad((w * log_z.sum(-1)).sum(), theta_logits)[0]
    assert g.abs().max() > 1e-3
