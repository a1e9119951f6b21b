"""aligndistil.data.prompt_sets: the shipped prompt sets and prompt files, with errors naming file and line."""

from __future__ import annotations

import pytest

from aligndistil.data import prompt_sets as tasks
from aligndistil.data.prompt_sets import PromptFileError, load_prompts
from aligndistil.rewards import get_reward


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
