"""Naive float64 reference implementations written directly from the formulas in docs/math.md.

Independent of the package on purpose: explicit loops over the batch ``b`` and the
response tokens ``t``, an explicit softmax ``exp(z) / sum exp(z)``, and the formulas as
docs/math.md writes them. They are slow and only meant for tiny tensors. They use torch scalar
ops so that autograd gives the reference gradient too.
"""

from __future__ import annotations

import torch


def softmax(z: torch.Tensor) -> torch.Tensor:
    """Explicit softmax of a 1-D logit vector (max-shifted for stability only)."""
    e = torch.exp(z - z.max().detach())
    return e / e.sum()


def log_prob(z: torch.Tensor, v: int) -> torch.Tensor:
    """``log softmax(z)[v]`` for a 1-D logit vector."""
    return torch.log(softmax(z)[v])


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` for 1-D logit vectors (docs/math.md, Notation)."""
    p, q = softmax(p_logits), softmax(q_logits)
    total = torch.zeros((), dtype=p.dtype)
    for v in range(p.shape[0]):
        total = total + p[v] * (torch.log(p[v]) - torch.log(q[v]))
    return total


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log sigma(x) = -log(1 + exp(-x))`` (inputs here are moderate)."""
    return -torch.log(1.0 + torch.exp(-x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def seq_logp(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """``log pi(y|x) = sum_t log pi(y_t|s_t)`` over the response tokens of row ``b``."""
    total = torch.zeros((), dtype=logits.dtype)
    for t in range(logits.shape[1]):
        if mask[b, t] > 0:
            total = total + log_prob(logits[b, t], int(labels[b, t]))
    return total


def _stack(xs):
    return torch.stack(xs)


# ----------------------------------------------------------------------------- DPO family


def dpo(pc, pr, rc, rr, lc, lr, mc, mr, *, beta, reverse=False):
    """docs/math.md: ``-log sigma(beta (Delta_theta - Delta_ref))``; reverse: y_w and y_l exchanged."""
    out = []
    for b in range(pc.shape[0]):
        w_pol, l_pol = seq_logp(pc, lc, mc, b), seq_logp(pr, lr, mr, b)
        w_ref, l_ref = seq_logp(rc, lc, mc, b), seq_logp(rr, lr, mr, b)
        if reverse:
            w_pol, l_pol, w_ref, l_ref = l_pol, w_pol, l_ref, w_ref
        out.append(-log_sigmoid(beta * ((w_pol - l_pol) - (w_ref - l_ref))))
    return _stack(out)


def ipo(pc, pr, rc, rr, lc, lr, mc, mr, *, beta):
    """IPO (Azar et al.): ``(h - 1/(2 tau))^2``, ``h = Delta_theta - Delta_ref``."""
    out = []
    for b in range(pc.shape[0]):
        h = (seq_logp(pc, lc, mc, b) - seq_logp(pr, lr, mr, b)) - (seq_logp(rc, lc, mc, b) - seq_logp(rr, lr, mr, b))
        out.append((h - 1.0 / (2.0 * beta)) ** 2)
    return _stack(out)


def dpop(pc, pr, rc, rr, lc, lr, mc, mr, *, beta, lam):
    """DPOP (Pal et al.): ``-log sigma(beta (Delta_theta - Delta_ref - lam max(0, log pi_ref(y_w) - log pi_theta(y_w))))``."""
    out = []
    for b in range(pc.shape[0]):
        w_pol, l_pol = seq_logp(pc, lc, mc, b), seq_logp(pr, lr, mr, b)
        w_ref, l_ref = seq_logp(rc, lc, mc, b), seq_logp(rr, lr, mr, b)
        pen = w_ref - w_pol
        pen = pen if float(pen.detach()) > 0 else pen * 0.0
        out.append(-log_sigmoid(beta * ((w_pol - l_pol) - (w_ref - l_ref) - lam * pen)))
    return _stack(out)


def simpo(pc, pr, lc, lr, mc, mr, *, beta, gamma):
    """docs/math.md (SimPO): ``-log sigma((beta/|y_w|) log pi(y_w|x) - (beta/|y_l|) log pi(y_l|x) - gamma)``."""
    out = []
    for b in range(pc.shape[0]):
        nw = sum(1 for t in range(mc.shape[1]) if mc[b, t] > 0)
        nl = sum(1 for t in range(mr.shape[1]) if mr[b, t] > 0)
        x = beta / nw * seq_logp(pc, lc, mc, b) - beta / nl * seq_logp(pr, lr, mr, b) - gamma
        out.append(-log_sigmoid(x))
    return _stack(out)


def kto(pol, ref, labels, mask, desirable, z0, *, beta, lam_d, lam_u):
    """KTO (Ethayarajh et al.): desirable ``lam_d (1 - sigma(beta (r - z0)))``, else ``lam_u (1 - sigma(beta (z0 - r)))``."""
    z0 = max(float(z0), 0.0)
    out = []
    for b in range(pol.shape[0]):
        r = seq_logp(pol, labels, mask, b) - seq_logp(ref, labels, mask, b)
        if bool(desirable[b]):
            out.append(lam_d * (1.0 - sigmoid(beta * (r - z0))))
        else:
            out.append(lam_u * (1.0 - sigmoid(beta * (z0 - r))))
    return _stack(out)


# ------------------------------------------------------------------ TDPO / SparsePO


def token_level_dpo(
    pc, pr, rc, rr, lc, lr, mc, mr, *, beta, alpha=1.0, stop_grad_chosen_kl=False,
    mu_c=None, mu_r=None, md_c=None, md_r=None, lambda_u=0.0, lambda_d=0.0,
):
    """TDPO1/TDPO2/SparsePO from docs/math.md, token by token.

    ``u = beta sum_t m_u log pi_theta/pi_ref (y_w,t) - beta sum_t m_u log pi_theta/pi_ref (y_l,t)``
    ``delta = beta sum_t m_d KL(pi_ref||pi_theta)(y_l,t) - [sg](beta sum_t m_d KL(pi_ref||pi_theta)(y_w,t))``
    ``L = -log sigma(u - alpha delta) + lambda_u ||m_u||_1 + lambda_d ||m_d||_1``
    """
    def one(x, b, t):
        return 1.0 if x is None else x[b, t]

    out = []
    for b in range(pc.shape[0]):
        u_w = torch.zeros((), dtype=pc.dtype)
        kl_w = torch.zeros((), dtype=pc.dtype)
        l1_u = torch.zeros((), dtype=pc.dtype)
        l1_d = torch.zeros((), dtype=pc.dtype)
        for t in range(pc.shape[1]):
            if mc[b, t] > 0:
                y = int(lc[b, t])
                u_w = u_w + one(mu_c, b, t) * (log_prob(pc[b, t], y) - log_prob(rc[b, t], y))
                kl_w = kl_w + one(md_c, b, t) * kl(rc[b, t], pc[b, t])  # reference FIRST
                l1_u = l1_u + abs(one(mu_c, b, t))
                l1_d = l1_d + abs(one(md_c, b, t))
        u_l = torch.zeros((), dtype=pr.dtype)
        kl_l = torch.zeros((), dtype=pr.dtype)
        for t in range(pr.shape[1]):
            if mr[b, t] > 0:
                y = int(lr[b, t])
                u_l = u_l + one(mu_r, b, t) * (log_prob(pr[b, t], y) - log_prob(rr[b, t], y))
                kl_l = kl_l + one(md_r, b, t) * kl(rr[b, t], pr[b, t])
                l1_u = l1_u + abs(one(mu_r, b, t))
                l1_d = l1_d + abs(one(md_r, b, t))
        u = beta * u_w - beta * u_l
        seqkl_w = beta * kl_w
        if stop_grad_chosen_kl:
            seqkl_w = seqkl_w.detach()
        delta = beta * kl_l - seqkl_w
        out.append(-log_sigmoid(u - alpha * delta) + lambda_u * l1_u + lambda_d * l1_d)
    return _stack(out)


# ---------------------------------------------------------------------- AlignDistil


def aligndistil(policy, teacher, mask, *, alpha, beta0, weighting="beta_t"):
    """AlignDistil Eq. 16 (docs/math.md, AlignDistil): ``L = (1/|y|) sum_t beta_t KL(pi_theta(.|s_t) || softmax(z*_t))``, ``beta_t = beta0/alpha_t``."""
    out = []
    teacher = teacher.detach()
    for b in range(policy.shape[0]):
        total = torch.zeros((), dtype=policy.dtype)
        n = 0
        for t in range(policy.shape[1]):
            if mask[b, t] > 0:
                n += 1
                if weighting == "uniform":
                    w = 1.0
                else:
                    a = float(alpha[b, t]) if isinstance(alpha, torch.Tensor) and alpha.dim() > 0 else float(alpha)
                    w = beta0 / a
                total = total + w * kl(policy[b, t], teacher[b, t])  # student FIRST
        out.append(total / n)
    return _stack(out)


def teacher(base, negative, alpha):
    """``z* = base + alpha (base - negative)`` entry by entry."""
    out = torch.empty_like(base)
    B, T, V = base.shape
    for b in range(B):
        for t in range(T):
            a = float(alpha[b, t]) if isinstance(alpha, torch.Tensor) and alpha.dim() > 0 else float(alpha)
            for v in range(V):
                out[b, t, v] = base[b, t, v] + a * (base[b, t, v] - negative[b, t, v])
    return out


def tvd(p_logits, q_logits):
    """``1/2 sum_v |p(v) - q(v)|`` for 1-D logit vectors."""
    p, q = softmax(p_logits), softmax(q_logits)
    return 0.5 * sum(abs(float(p[v]) - float(q[v])) for v in range(p.shape[0]))
