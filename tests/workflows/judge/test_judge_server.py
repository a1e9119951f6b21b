"""Against a REAL OpenAI-compatible server: llama.cpp serving SmolLM2-135M-Instruct on 127.0.0.1.

The fixture (conftest.py) starts the server once per session and stops it at the end.
SmolLM2-135M is far too small to judge well: these tests check that the whole path works
against a real server (the protocol, the model check, answering, judging, caching,
counting replies without a verdict), not the verdicts themselves.
"""

from __future__ import annotations

import json

import pytest

from aligndistil.cli import main

SECRET = "sk-test-real-server-9d1e"


def test_the_real_server_lists_its_model_and_rejects_another(llama_server):
    from aligndistil.workflows.judge.client import ChatClient, JudgeError

    assert ChatClient(llama_server["url"], "smollm2").check() == ["smollm2"]
    with pytest.raises(JudgeError, match=r"has no model 'gpt-4o'; it serves \['smollm2'\]"):
        ChatClient(llama_server["url"], "gpt-4o").check()


def test_the_real_server_answers_and_the_answer_is_cached(llama_server, tmp_path):
    from aligndistil.workflows.judge.client import ChatClient

    c = ChatClient(llama_server["url"], "smollm2", cache_dir=tmp_path / "cache")
    msgs = [{"role": "user", "content": "Name one colour."}]
    text = c.complete(msgs, max_tokens=16, seed=1)
    assert isinstance(text, str) and text.strip()
    assert ChatClient(llama_server["url"], "smollm2", cache_dir=tmp_path / "cache").complete(
        msgs, max_tokens=16, seed=1) == text
    assert c.stats.completed == 1


def test_judge_run_with_the_real_server_as_judge_and_answerer(llama_server, tiny_ws, tmp_path, monkeypatch):
    # SmolLM2 served by llama.cpp answers (api:smollm2) against the tiny random model, and
    # judges both: pairwise in both orders and single grades, on two questions, one of
    # them with two turns and a reference.
    monkeypatch.setenv("REAL_JUDGE_KEY", SECRET)
    qfile = tmp_path / "q.jsonl"
    rows = [{"question_id": "m1", "category": "math", "turns": ["What is 3 + 4?", "And 3 * 4?"],
             "reference": ["7", "12"]},
            {"instruction": "Name a fruit that is yellow."}]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "real"
    argv = ["judge", "--models", "smol=api:smollm2", "--baseline", f"tiny={tiny_ws['model']}", "--mode", "both",
            "--questions", str(qfile), "--judge-base-url", llama_server["url"], "--judge-model", "smollm2",
            "--api-key-env", "REAL_JUDGE_KEY", "--max-new-tokens", "24", "--judge-max-tokens", "48",
            "--parse-retries", "1", "--concurrency", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    pw = res["pairwise"]["smol"]
    assert pw["n"] + pw["unparsed"] == 2 and pw["wins"] + pw["ties"] + pw["losses"] == pw["n"]
    assert {r["question_id"] for r in pw["records"]} == {"m1", "2"}
    for name in ("smol", "tiny"):
        assert res["single"][name]["n"] + res["single"][name]["unparsed"] == 3      # 2 + 1 turns
    assert res["models"]["smol"]["template"] == "the server's own"
    smol_answers = next((out / "answers").glob("smol-*.jsonl")).read_text().splitlines()
    assert len(smol_answers) == 3 and all(json.loads(a)["answer"] for a in smol_answers)
    assert (out / "win_rates.png").is_file() and "| smol |" in (out / "results.md").read_text()
    for p in out.rglob("*"):
        if p.is_file() and p.suffix != ".png":
            assert SECRET not in p.read_text(), p
    # A rerun: every answer and every judgment comes from the caches.
    sent = res["requests"]["judge"]["requests"]
    assert sent >= 2 * 2 + 2 * 3
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["requests"]["judge"]["requests"] == 0 and again["requests"]["answers smol"]["requests"] == 0
    assert again["pairwise"]["smol"]["records"] == pw["records"]
