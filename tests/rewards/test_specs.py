"""aligndistil.rewards.specs: reward specs, their resolution and the checks on every score.

User rewards are defined in this module and resolved through the ``module:function`` spec.
"""

from __future__ import annotations

import math

import pytest

from aligndistil import rewards
from aligndistil.rewards import CheckedReward, RewardError, get_reward

MODULE = __name__  # "test_specs" or "tests.rewards.test_specs", depending on rootdir layout


# --- user rewards resolved by spec -------------------------------------------------------


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)


def inf_reward(prompts, responses):
    return [math.inf] * len(responses)


def short_reward(prompts, responses):
    return [0.0]


def raising_reward(prompts, responses):
    raise KeyError("missing field")


def string_reward(prompts, responses):
    return ["1.0"] * len(responses)


class Namespace:
    @staticmethod
    def nested(prompts, responses):
        return [1.0] * len(responses)


NOT_CALLABLE = 3


# --- spec resolution and checks ----------------------------------------------------------


def test_module_function_spec():
    reward = get_reward(f"{MODULE}:length_reward")
    assert isinstance(reward, CheckedReward)
    assert reward(["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    assert get_reward(f"{MODULE}:Namespace.nested")(["a"], ["b"]) == [1.0]


def test_callable_passes_through_checked():
    reward = get_reward(length_reward)
    assert reward(["a"], ["ab"]) == [2.0]
    assert "length_reward" in reward.name


@pytest.mark.parametrize("fn", ["nan_reward", "inf_reward"])
def test_non_finite_scores_rejected(fn):
    with pytest.raises(ValueError, match=rf"{fn}.*non-finite"):
        get_reward(f"{MODULE}:{fn}")(["a", "b"], ["x", "y"])


def test_wrong_count_rejected():
    with pytest.raises(ValueError, match=r"short_reward.*1 scores for 2"):
        get_reward(f"{MODULE}:short_reward")(["a", "b"], ["x", "y"])


def test_non_numeric_rejected():
    with pytest.raises(ValueError, match="string_reward"):
        get_reward(f"{MODULE}:string_reward")(["a"], ["x"])


def test_raising_reward_wrapped():
    with pytest.raises(RewardError, match=r"raising_reward.*KeyError.*missing field") as info:
        get_reward(f"{MODULE}:raising_reward")(["a"], ["x"])
    assert isinstance(info.value.__cause__, KeyError)


def test_mismatched_inputs_rejected():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        get_reward(f"{MODULE}:length_reward")(["a", "b"], ["x"])


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("no_such_module_xyz:f", "cannot import module"),
        (f"{MODULE}:does_not_exist", "no attribute"),
        (f"{MODULE}:NOT_CALLABLE", "not a callable"),
        (f"{MODULE}:", "module:function"),
        ("sentiment", "unknown reward"),
        ("", "non-empty"),
    ],
)
def test_bad_specs(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_reward(spec)


def test_builtins_listed():
    assert "vader" in rewards.BUILTIN_REWARDS


def test_module_function_imports_from_the_working_directory(tmp_path, monkeypatch):
    """The installed `aligndistil` script does not put the working directory on sys.path
    (python -m does); a reward module beside the user's data must import all the same."""
    import os
    import sys

    (tmp_path / "cwd_reward_mod.py").write_text("def score(prompts, responses):\n    return [1.5] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", cwd, str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_reward_mod", raising=False)
    reward = get_reward("cwd_reward_mod:score")
    assert reward(["p"], ["r"]) == [1.5]
    assert sys.path[0] == cwd
