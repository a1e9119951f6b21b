"""Verdict parsing, the prompts file, pairwise in both orders, single grades, the reward pairing."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("openai")

from aligndistil.workflows.judge.client import ChatClient, JudgeError  # noqa: E402
from aligndistil.workflows.judge.grading import (Judge, compare_by_reward, compare_pairwise,  # noqa: E402
                                                 default_prompts_path, grade_single, load_judge_prompts,
                                                 parse_rating, parse_verdict)
from aligndistil.workflows.judge.questions import Question  # noqa: E402

QS = [Question("1", ("Say something kind.",)), Question("2", ("Name a colour.", "Now another one."), "writing")]


def _judge(stub, tmp_path, parse_retries=1):
    client = ChatClient(stub.url, "stub-judge", cache_dir=tmp_path / "cache", backoff=0.01, concurrency=2)
    return Judge(client, load_judge_prompts(), parse_retries=parse_retries)


def _user_text(body) -> str:
    return body["messages"][1]["content"]


@pytest.mark.parametrize("text, rating", [
    ("Fine work. Rating: [[8]]", 8.0), ("[[3]] first, then Rating: [[9]]", 9.0), ("Rating: 6", 6.0),
    ("Rating: [[7.5]]", 7.5), ("Rating: [[11]]", None), ("Rating: [[0]]", None), ("no grade here", None), ("", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("text, verdict", [
    ("A is better. [[A]]", "A"), ("[[A]] ... on reflection [[B]]", "B"), ("a tie: [[C]]", "C"),
    ("[[ B ]]", "B"), ("A is better", None), ("[[D]]", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_default_prompts_load_and_a_broken_copy_is_named(tmp_path):
    prompts = load_judge_prompts()
    assert "Rating: [[N]]" in prompts["single_system"] and "[[C]]" in prompts["pair_system"]
    text = default_prompts_path().read_text(encoding="utf-8")
    missing = tmp_path / "missing.yaml"
    missing.write_text(re.sub(r"(?ms)^pair_multi_ref:.*?(?=^\S)", "", text), encoding="utf-8")
    with pytest.raises(JudgeError, match=r"missing.yaml: key 'pair_multi_ref' is missing"):
        load_judge_prompts(missing)
    badfield = tmp_path / "badfield.yaml"
    badfield.write_text(text.replace("{answer_b}", "{answer_c}", 1), encoding="utf-8")
    with pytest.raises(JudgeError, match=r"'pair': unknown field\(s\) \['answer_c'\]"):
        load_judge_prompts(badfield)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text + "\nextra: hi\n", encoding="utf-8")
    with pytest.raises(JudgeError, match="unknown key"):
        load_judge_prompts(unknown)


def test_a_position_biased_judge_yields_ties(stub_server, tmp_path):
    # The judge always picks whatever is shown first: the two orders disagree on every
    # question, so every outcome is a tie, never a win or a loss.
    stub_server.reply = lambda body: "The first one. [[A]]"
    recs = compare_pairwise(_judge(stub_server, tmp_path), QS, {"1": ["x"], "2": ["y", "z"]},
                            {"1": ["xx"], "2": ["yy", "zz"]})
    assert [r["outcome"] for r in recs] == [0.5, 0.5]
    assert recs[0]["verdicts"] == {"model_first": "win", "baseline_first": "loss"}
    assert len(stub_server.requests) == 4                 # 2 questions x 2 orders
    assert (recs[1]["len_model"], recs[1]["len_baseline"]) == (2, 4)


def test_a_consistent_judge_gives_wins_and_losses_in_both_orders(stub_server, tmp_path):
    # The judge prefers the reply containing GOOD, wherever it is shown.
    def reply(body):
        text = _user_text(body)
        b_part = text.split("[Reply of assistant B]" if "[Reply of" in text else "[Conversation with assistant B]")[1]
        return "[[B]]" if "GOOD" in b_part else "[[A]]"

    stub_server.reply = reply
    model = {"1": ["GOOD answer"], "2": ["meh", "meh"]}
    base = {"1": ["meh"], "2": ["GOOD", "GOOD"]}
    recs = compare_pairwise(_judge(stub_server, tmp_path), QS, model, base)
    assert [r["outcome"] for r in recs] == [1.0, 0.0]
    # The multi-turn question is judged on whole conversations.
    multi = [_user_text(b) for b, _ in stub_server.requests if "Now another one." in _user_text(b)]
    assert len(multi) == 2 and all("### Turn 2" in t for t in multi)


def test_unparseable_replies_are_retried_then_counted_not_lost(stub_server, tmp_path):
    stub_server.reply = lambda body: "Both are nice."
    recs = compare_pairwise(_judge(stub_server, tmp_path, parse_retries=2), QS[:1], {"1": ["a"]}, {"1": ["b"]})
    assert recs[0]["outcome"] is None and recs[0]["attempts"] == 6
    assert len(stub_server.requests) == 6                 # 2 orders x (1 + 2 reminders)
    last = stub_server.requests[-1][0]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "[[A]], [[B]], [[C]]" in last[-1]["content"]


def test_a_reminder_can_rescue_a_verdict(stub_server, tmp_path):
    stub_server.reply = lambda body: "[[C]]" if len(body["messages"]) > 2 else "Hmm."
    recs = compare_pairwise(_judge(stub_server, tmp_path), QS[:1], {"1": ["a"]}, {"1": ["b"]})
    assert recs[0]["outcome"] == 0.5 and recs[0]["attempts"] == 4


def test_single_grades_each_turn_with_the_reference_where_there_is_one(stub_server, tmp_path):
    stub_server.reply = lambda body: "Rating: [[4]]" if "Reference" in _user_text(body) else "Rating: [[9]]"
    qs = [Question("m", ("2+2?", "Times 3?"), "math", ("4", "12")), Question("w", ("Write.",), "writing")]
    recs = grade_single(_judge(stub_server, tmp_path), qs, {"x": {"m": ["4", "12"], "w": ["Hi."]}})
    assert [(r["question_id"], r["turn"], r["score"]) for r in recs] == [("m", 1, 4.0), ("m", 2, 4.0), ("w", 1, 9.0)]
    turn2 = [_user_text(b) for b, _ in stub_server.requests if "turn 2" in _user_text(b)]
    assert turn2 and "Turn 1: 4" in turn2[0] and "Turn 2: 12" in turn2[0] and "Times 3?" in turn2[0]


def test_reward_pairing_and_ties_within_eps():
    # Reward: the number of "!" in a response. Question 2 has two turns: the mean counts.
    def bangs(prompts, responses):
        return [float(r.count("!")) for r in responses]

    model = {"1": ["wow!!"], "2": ["a!", "b!!!"]}       # means 2 and 2
    base = {"1": ["ok!"], "2": ["c!!", "d!!"]}          # means 1 and 2
    recs = compare_by_reward(bangs, QS, model, base)
    assert [r["outcome"] for r in recs] == [1.0, 0.5]
    assert (recs[1]["reward_model"], recs[1]["reward_baseline"]) == (2.0, 2.0)
    assert [r["outcome"] for r in compare_by_reward(bangs, QS, model, base, tie_eps=1.0)] == [0.5, 0.5]
    assert [r["outcome"] for r in compare_by_reward(bangs, QS, base, model)] == [0.0, 0.5]
