"""Tests for aligndistil.rewards (reward specs and checks) and aligndistil.data.prompt_sets (prompts).

All offline: VADER's lexicon ships in its wheel, and user rewards are defined in this
module and resolved through the ``module:function`` spec.
"""

from __future__ import annotations

import math
import sys

import pytest

from aligndistil import rewards
from aligndistil.data import prompt_sets as tasks
from aligndistil.rewards import CheckedReward, RewardError, get_reward
from aligndistil.data.prompt_sets import PromptFileError, load_prompts

MODULE = __name__  # "test_rewards" or "tests.test_rewards", depending on rootdir layout


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


# --- vader -----------------------------------------------------------------------------


def test_vader_orders_sentiment():
    vader = get_reward("vader")
    pos, neu, neg = vader(
        ["p"] * 3,
        [
            "This was a wonderful, delightful evening and I loved every minute of it!",
            "The bus leaves at nine.",
            "Awful service, cold food, and a rude waiter. I hated it.",
        ],
    )
    assert pos > 0.5
    assert neu == 0.0
    assert neg < -0.5
    assert all(isinstance(x, float) for x in (pos, neu, neg))


def test_vader_ignores_prompt_and_handles_empty():
    vader = get_reward("vader")
    assert vader(["I love this", "I hate this"], ["", ""]) == [0.0, 0.0]
    assert vader([], []) == []


def test_vader_missing_package_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        get_reward("vader")


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


# --- prompt sets -----------------------------------------------------------------------


def test_shipped_prompt_sets():
    train = load_prompts("sentiment:train")
    test = load_prompts("sentiment:test")
    assert len(train) + len(test) >= 420
    assert len(test) >= 75
    assert not set(train) & set(test), "a prompt is in both splits"
    for prompt in train + test:
        assert prompt and prompt == prompt.strip()
        assert "\n" not in prompt


def test_shipped_prompts_are_neutral():
    # The task is to move sentiment; prompts that are already strongly positive or
    # negative would blur the measurement.
    vader = get_reward("vader")
    prompts = load_prompts("sentiment:train") + load_prompts("sentiment:test")
    scores = vader(prompts, prompts)
    assert max(abs(s) for s in scores) < 0.5
    assert abs(sum(scores) / len(scores)) < 0.05


def test_load_prompts_from_path(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("First prompt:\n  Second prompt?  \n", encoding="utf-8")
    assert load_prompts(path) == ["First prompt:", "Second prompt?"]
    assert load_prompts(str(path)) == ["First prompt:", "Second prompt?"]


def test_load_prompts_duplicate_names_file_and_line(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("alpha\nbeta\ngamma\nbeta\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"dups\.txt, line 4: duplicate of line 2"):
        load_prompts(path)


@pytest.mark.parametrize("content, line", [("a\n\nb\n", 2), ("a\nb\n   \n", 3), ("\na\n", 1)])
def test_load_prompts_empty_line_names_file_and_line(tmp_path, content, line):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"empty\.txt, line {line}: empty line"):
        load_prompts(path)


def test_load_prompts_missing_and_unknown(tmp_path):
    with pytest.raises(PromptFileError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptFileError, match="unknown prompt set"):
        tasks.prompt_set_path("sentiment:validation")


def test_load_prompts_empty_file(tmp_path):
    path = tmp_path / "none.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(path)
