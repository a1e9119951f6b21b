"""Win rates with intervals, and the length-controlled win rate.

Outcomes are per question, from the model's side: 1 (win), 0.5 (tie), 0 (loss). The win
rate is their mean, ties counting half, with the normal-approximation 95% interval of
:func:`aligndistil.workflows.evaluate.mean_ci95`.

Judges favour longer answers, so a model can "win" by talking more. The length-controlled
win rate follows AlpacaEval 2 ("Length-Controlled AlpacaEval: A Simple Way to Debias
Automatic Evaluators", Sec. 3, Eq. 2), reduced to one model against one baseline: a
logistic model of the judge's preference with the length difference as a covariate,

    P(model preferred | question i) = sigmoid(theta + phi * tanh(d_i / s)),

where ``d_i`` is the model's answer length minus the baseline's (characters, all turns)
and ``s`` the standard deviation of the ``d_i``. The fit maximises the log-likelihood
with the outcomes as soft labels (a tie counts as half a win and half a loss) plus a small
ridge ``l2 / 2 * (theta^2 + phi^2)`` that keeps the estimate finite when every outcome is
the same. The length-controlled win rate is the model's prediction at zero length
difference, ``sigmoid(theta)``. Its 95% interval is ``sigmoid(theta +- 1.96 * se)`` with
``se`` from the sandwich (robust) covariance, which stays valid for soft labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from aligndistil.workflows.evaluate import mean_ci95

__all__ = ["OUTCOME", "length_controlled_win_rate", "fit_logistic", "win_rate"]

#: Outcome values from the model's side.
OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}
Z95 = 1.959963984540054


def win_rate(outcomes: Sequence[float | None]) -> dict:
    """Counts and the win rate (ties count half) with its 95% half-width.

    ``None`` outcomes (judgments that could not be parsed) are counted as ``unparsed`` and
    left out of the rate: they are neither wins nor losses.
    """
    known = [float(o) for o in outcomes if o is not None]
    res = {
        "n": len(known),
        "wins": sum(1 for o in known if o == 1.0),
        "ties": sum(1 for o in known if o == 0.5),
        "losses": sum(1 for o in known if o == 0.0),
        "unparsed": sum(1 for o in outcomes if o is None),
        "win_rate": float("nan"),
        "ci95": float("nan"),
    }
    if known:
        res["win_rate"], res["ci95"] = mean_ci95(known)
    return res


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def fit_logistic(x: Sequence[float], y: Sequence[float], l2: float = 1e-2, iters: int = 100) -> dict:
    """Fit ``P(y=1) = sigmoid(a + b x)`` to soft labels ``y`` in [0, 1] by Newton's method.

    Maximises ``sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - l2 / 2 (a^2 + b^2)``.
    Returns ``a``, ``b`` and the sandwich covariance ``cov`` (2 x 2 list) of ``(a, b)``:
    ``H^-1 (sum_i g_i g_i^T) H^-1`` with ``g_i = (y_i - p_i) (1, x_i)`` and ``H`` the
    penalised information ``sum_i p_i (1 - p_i) (1, x_i)(1, x_i)^T + l2 I``.
    """
    X = np.column_stack([np.ones(len(x)), np.asarray(x, dtype=float)])
    Y = np.asarray(y, dtype=float)
    if len(Y) == 0:
        raise ValueError("fit_logistic needs at least one outcome")
    if ((Y < 0) | (Y > 1)).any() or not np.isfinite(X).all():
        raise ValueError("fit_logistic needs labels in [0, 1] and finite covariates")
    w = np.zeros(2)
    eye = np.eye(2)
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (Y - p) - l2 * w
        H = (X * (p * (1 - p))[:, None]).T @ X + l2 * eye
        step = np.linalg.solve(H, grad)
        w = w + step
        if np.abs(step).max() < 1e-12:
            break
    p = _sigmoid(X @ w)
    H = (X * (p * (1 - p))[:, None]).T @ X + l2 * eye
    G = X * (Y - p)[:, None]
    Hinv = np.linalg.inv(H)
    cov = Hinv @ (G.T @ G) @ Hinv
    return {"a": float(w[0]), "b": float(w[1]), "cov": cov.tolist()}


def length_controlled_win_rate(outcomes: Sequence[float | None], length_diffs: Sequence[float],
                               l2: float = 1e-2) -> dict:
    """The length-controlled win rate ``sigmoid(theta)`` and its 95% interval.

    Args:
        outcomes: per question, 1 / 0.5 / 0 (``None``: unparsed, left out).
        length_diffs: per question, the model's answer length minus the baseline's.
        l2: the ridge on ``(theta, phi)``.

    Returns:
        ``lc_win_rate``, ``ci_low``, ``ci_high``, ``theta``, ``phi`` (the length slope),
        ``scale`` (``s``, the standard deviation of the length differences) and ``n``.
        With fewer than two outcomes everything but ``n`` is NaN.
    """
    if len(outcomes) != len(length_diffs):
        raise ValueError(f"{len(outcomes)} outcomes but {len(length_diffs)} length differences")
    pairs = [(float(o), float(d)) for o, d in zip(outcomes, length_diffs) if o is not None]
    nan = float("nan")
    res = {"lc_win_rate": nan, "ci_low": nan, "ci_high": nan, "theta": nan, "phi": nan, "scale": nan,
           "n": len(pairs)}
    if len(pairs) < 2:
        return res
    y = [o for o, _ in pairs]
    d = np.asarray([d for _, d in pairs])
    scale = float(d.std())
    # All lengths equal: the covariate is constant 0 and the ridge sends phi to 0.
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    fit = fit_logistic(x, y, l2=l2)
    se = math.sqrt(max(fit["cov"][0][0], 0.0))
    res.update(lc_win_rate=float(_sigmoid(fit["a"])), ci_low=float(_sigmoid(fit["a"] - Z95 * se)),
               ci_high=float(_sigmoid(fit["a"] + Z95 * se)), theta=fit["a"], phi=fit["b"], scale=scale)
    return res
