"""Win rates and the length-controlled win rate, on outcomes whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aligndistil.workflows.judge.stats import fit_logistic, length_controlled_win_rate, win_rate


def test_win_rate_counts_ties_half_and_leaves_unparsed_out():
    res = win_rate([1.0, 1.0, 0.5, 0.0, None])
    assert (res["n"], res["wins"], res["ties"], res["losses"], res["unparsed"]) == (4, 2, 1, 1, 1)
    # mean (1 + 1 + 0.5 + 0) / 4 = 0.625; deviations .375 .375 -.125 -.625, squares sum to
    # 0.6875, sample variance 0.6875 / 3, half-width 1.96 * sqrt(0.6875 / 3 / 4) = 0.46914.
    assert res["win_rate"] == pytest.approx(0.625)
    assert res["ci95"] == pytest.approx(1.96 * math.sqrt(0.6875 / 3 / 4), rel=1e-3)
    assert res["ci95"] == pytest.approx(0.46914, abs=1e-4)


def test_win_rate_of_nothing_parsed_is_nan_not_zero():
    res = win_rate([None, None])
    assert res["n"] == 0 and res["unparsed"] == 2 and math.isnan(res["win_rate"])


def test_lc_two_length_groups_recover_the_hand_computed_intercept():
    # Two groups of 100 questions, the model's answers 40 characters longer in one and 40
    # shorter in the other. Longer: 80 wins, 20 losses; shorter: 50 / 50. The logistic model
    # has two parameters for two groups, so it fits both rates exactly:
    #   sigmoid(theta + phi x) = 0.8 and sigmoid(theta - phi x) = 0.5, x = tanh(40 / 40),
    # hence theta = (logit 0.8 + logit 0.5) / 2 = ln(4) / 2 = ln 2 and the length-controlled
    # win rate is sigmoid(ln 2) = 2/3, while the raw win rate is 130 / 200 = 0.65.
    outcomes = [1.0] * 80 + [0.0] * 20 + [1.0] * 50 + [0.0] * 50
    diffs = [40.0] * 100 + [-40.0] * 100
    res = length_controlled_win_rate(outcomes, diffs)
    assert win_rate(outcomes)["win_rate"] == pytest.approx(0.65)
    assert res["scale"] == pytest.approx(40.0)          # std of the differences (all +-40)
    assert res["theta"] == pytest.approx(math.log(2), abs=2e-3)   # the ridge moves it by < 1e-3
    assert res["lc_win_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert res["phi"] == pytest.approx(math.log(4) / (2 * math.tanh(1.0)), abs=5e-3)
    assert res["ci_low"] < 2 / 3 < res["ci_high"]


def test_lc_removes_a_pure_length_preference():
    # By construction the judge prefers the model only through length: P(win) =
    # sigmoid(0 + 1.5 tanh(d / s)), so at equal length it is a coin flip (LC = 0.5). The
    # model is usually longer, so its raw win rate is well above 0.5.
    rng = np.random.default_rng(0)
    d = rng.normal(150.0, 100.0, size=4000)
    x = np.tanh(d / d.std())
    y = (rng.random(4000) < 1 / (1 + np.exp(-1.5 * x))).astype(float)
    res = length_controlled_win_rate(list(y), list(d))
    assert win_rate(list(y))["win_rate"] > 0.7
    assert res["lc_win_rate"] == pytest.approx(0.5, abs=0.04)
    assert res["ci_low"] < 0.5 < res["ci_high"]
    assert res["phi"] == pytest.approx(1.5, abs=0.25)


def test_lc_with_soft_tie_labels_and_a_true_advantage():
    # P(win) = sigmoid(1 + 0.8 x): LC = sigmoid(1) = 0.731. Every fourth outcome is replaced
    # by a tie (0.5), which halves its pull: the fit of soft labels then estimates
    # E[y] = 0.75 sigmoid(.) + 0.125, i.e. at x = 0 about 0.673 - still centred, well above 0.5.
    rng = np.random.default_rng(1)
    d = rng.normal(-50.0, 80.0, size=4000)
    x = np.tanh(d / d.std())
    y = (rng.random(4000) < 1 / (1 + np.exp(-(1.0 + 0.8 * x)))).astype(float)
    y[::4] = 0.5
    res = length_controlled_win_rate(list(y), list(d))
    expected = 0.75 / (1 + math.exp(-1.0)) + 0.125
    assert res["lc_win_rate"] == pytest.approx(expected, abs=0.03)


def test_lc_with_equal_lengths_is_the_raw_win_rate():
    outcomes = [1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0, 1.0]   # mean 5.5 / 8 = 0.6875
    res = length_controlled_win_rate(outcomes, [0.0] * 8)
    assert res["lc_win_rate"] == pytest.approx(0.6875, abs=2e-3)
    assert res["phi"] == pytest.approx(0.0, abs=1e-9)


def test_lc_unparsed_left_out_and_too_few_is_nan():
    res = length_controlled_win_rate([1.0, None, 0.0], [10.0, 99.0, -10.0])
    assert res["n"] == 2 and math.isfinite(res["lc_win_rate"])
    assert math.isnan(length_controlled_win_rate([1.0, None], [1.0, 2.0])["lc_win_rate"])
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0], [1.0, 2.0])


def test_fit_logistic_stays_finite_when_every_outcome_is_a_win():
    fit = fit_logistic([0.1, -0.2, 0.3], [1.0, 1.0, 1.0])
    assert math.isfinite(fit["a"]) and fit["a"] > 3
    with pytest.raises(ValueError):
        fit_logistic([0.0], [1.5])
