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


# ---------------------------------------------------------------- issue 16 item 6: eval prompts
def test_eval_prompts_from_training_data_formats(tmp_path):
    import json

    from aligndistil.data.prompt_sets import prompt_text, read_eval_prompts

    user = [{"role": "user", "content": "How are you?"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Fine"}], "rejected": "Bad"},
        {"prompt": user, "chosen": "Great", "rejected": "Awful"},  # the same prompt again
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go"},
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, note = read_eval_prompts(str(p))
    assert prompts == [user, [{"role": "user", "content": "Hi"}]]
    assert note == f"2 prompts from the 3 'pairs' records of {p} (1 repeated prompts kept once)"
    # Conversational pairs without a prompt field: the conversation they share.
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"chosen": user + [{"role": "assistant", "content": "A"}],
                                "rejected": user + [{"role": "assistant", "content": "B"}]}) + "\n")
    assert read_eval_prompts(conv)[0] == [user]
    # String prompts (prompt-only records) and plain text lines.
    s = tmp_path / "prompts.jsonl"
    s.write_text('{"prompt": "Review the film:"}\n{"prompt": "Review the cafe:"}\n')
    assert read_eval_prompts(s)[0] == ["Review the film:", "Review the cafe:"]
    t = tmp_path / "prompts.txt"
    t.write_text('{"prompt": "kept as text"}\nsecond line\n')
    assert read_eval_prompts(t)[0] == ['{"prompt": "kept as text"}', "second line"]
    assert prompt_text(user) == "How are you?" and prompt_text("x") == "x"


def test_eval_prompts_errors_name_file_and_line(tmp_path):
    from aligndistil.data import DataError
    from aligndistil.data.prompt_sets import read_eval_prompts

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"text": "a raw line"}\n')
    with pytest.raises(DataError, match=r"raw\.jsonl, line 1: cannot tell the data format from fields \['text'\]"):
        read_eval_prompts(raw)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a"}\n"just a string"\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: expected a JSON object, got str"):
        read_eval_prompts(mixed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: field 'prompt' must be a string or a message list"):
        read_eval_prompts(bad)
