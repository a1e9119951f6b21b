"""``aligndistil judge`` end to end on tiny models: judge-free, with a stub judge, and bad input."""

from __future__ import annotations

import json

import pytest

from aligndistil.cli import build_parser, main

SECRET = "sk-test-NEVER-ON-DISK-41c2"
FAST = ["--max-new-tokens", "6", "--batch-size", "4", "--no-progress"]


def _judge_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["judge"]


def test_every_judge_flag_has_help():
    for action in _judge_parser()._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help"


def test_judge_free_vader_win_rates_on_tiny_models_and_a_rerun_reuses_answers(tiny_ws, tmp_path, capsys):
    out = tmp_path / "vader"
    argv = ["judge", "--models", f"other={tiny_ws['model2']}", "--baseline", f"base={tiny_ws['model']}",
            "--questions", "sentiment:test", "--max-questions", "4", "--reward", "vader", "--mode", "both",
            "--out", str(out), *FAST]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    pw = res["pairwise"]["other"]
    assert pw["n"] == 4 and pw["wins"] + pw["ties"] + pw["losses"] == 4 and pw["unparsed"] == 0
    assert res["judge"] == {"reward": "vader", "tie_eps": 0.0}
    assert set(res["single"]) == {"other", "base"} and res["single"]["base"]["n"] == 4
    assert res["models"]["base"]["template"].startswith("custom (sha256")
    assert (out / "results.md").is_file() and (out / "win_rates.png").stat().st_size > 0
    assert "| other |" in capsys.readouterr().out
    answers = sorted((out / "answers").glob("*.jsonl"))
    assert [p.name.split("-")[0] for p in answers] == ["base", "other"]
    before = [p.read_text() for p in answers]
    assert all(len(t.splitlines()) == 4 for t in before)
    # A rerun answers nothing again; with two more questions it answers only those two.
    assert main(argv) == 0
    assert [p.read_text() for p in answers] == before
    assert main([*argv[:8], "6", *argv[9:]]) == 0
    assert all(len(p.read_text().splitlines()) == 6 for p in answers)
    assert json.loads((out / "results.json").read_text())["pairwise"]["other"]["n"] == 6


def test_stub_judge_run_writes_no_key_and_a_rerun_sends_nothing(tiny_ws, tmp_path, stub_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    stub_server.reply = lambda body: ("Rating: [[6]]" if "Rating" in body["messages"][0]["content"] else "[[A]]")
    out = tmp_path / "stub"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["1+1?", "2+2?"],
                                 "reference": ["2", "4"]}) + "\n" + json.dumps({"instruction": "Greet me."}) + "\n")
    argv = ["judge", "--models", f"m={tiny_ws['model2']}", "--baseline", f"b={tiny_ws['model']}", "--mode", "both",
            "--questions", str(qfile), "--judge-base-url", stub_server.url, "--judge-model", "stub-judge",
            "--api-key-env", "JUDGE_KEY_FOR_TEST", "--backoff", "0.01", "--out", str(out), *FAST]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pairwise"]["m"]["ties"] == 2               # "[[A]]" always: orders disagree
    assert res["single"]["m"]["mean"] == 6.0 and res["single"]["m"]["n"] == 3   # 2 + 1 turns
    sent = len(stub_server.requests)
    assert sent == 2 * 2 + 2 * 3 and res["requests"]["judge"]["requests"] == sent
    assert all(auth == f"Bearer {SECRET}" for _, auth in stub_server.requests)
    for p in out.rglob("*"):
        if p.is_file() and p.suffix != ".png":
            assert SECRET not in p.read_text(), p
    assert main(argv) == 0
    assert len(stub_server.requests) == sent
    assert json.loads((out / "results.json").read_text())["requests"]["judge"]["cache_hits"] == sent


def test_no_server_at_the_url_is_a_clear_error_and_writes_nothing(tiny_ws, tmp_path, capsys):
    from _judge_servers import free_port

    pytest.importorskip("openai")
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "none"
    rc = main(["judge", "--models", f"m={tiny_ws['model']}", "--baseline", f"b={tiny_ws['model2']}",
               "--questions", "sentiment:test", "--judge-base-url", url, "--judge-model", "x", "--timeout", "2",
               "--out", str(out), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"no OpenAI-compatible server answers at {url}" in err
    assert not out.exists()


def test_unknown_judge_model_is_named_with_what_the_server_has(tiny_ws, tmp_path, stub_server, capsys):
    out = tmp_path / "unknown"
    rc = main(["judge", "--models", f"m={tiny_ws['model']}", "--baseline", f"b={tiny_ws['model2']}",
               "--questions", "sentiment:test", "--judge-base-url", stub_server.url, "--judge-model", "gpt-9",
               "--out", str(out), *FAST])
    assert rc == 2
    assert "has no model 'gpt-9'; it serves ['stub-judge']" in capsys.readouterr().err
    assert not out.exists() and not stub_server.requests


def test_a_question_file_with_missing_fields_names_file_and_line(tiny_ws, tmp_path, capsys):
    qfile = tmp_path / "bad.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "turns": ["ok"]}) + "\n" + json.dumps({"question_id": 2}) + "\n")
    out = tmp_path / "bad"
    rc = main(["judge", "--models", f"m={tiny_ws['model']}", "--baseline", f"b={tiny_ws['model2']}",
               "--questions", str(qfile), "--reward", "vader", "--out", str(out), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{qfile}, line 2: missing field 'turns'" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "m=x", "--mode", "single", "--out", "o"], "--judge-base-url and --judge-model"),
    (["--models", "m=x", "--reward", "vader", "--out", "o"], "pass --baseline"),
    (["--models", "m=x", "--reward", "vader", "--mode", "single", "--judge-model", "j", "--out", "o"],
     "drop --judge-base-url/--judge-model, or drop --reward"),
    (["--models", "a/b=x", "--reward", "vader", "--mode", "single", "--out", "o"], "must not contain a slash"),
    (["--models", "m=x", "--baseline", "m=y", "--reward", "vader", "--out", "o"], "given twice"),
    (["--models", "m=stage:dpo", "--reward", "vader", "--mode", "single", "--out", "o"], "--pipeline-dir"),
    (["--models", "m=x", "--reward", "vader", "--mode", "single", "--temperature", "0", "--out", "o"],
     "--temperature > 0"),
])
def test_argument_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["judge", *argv, "--questions", "sentiment:test"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_judge_that_dies_mid_run_loses_nothing(tiny_ws, tmp_path, stub_server, capsys):
    # Three good replies, then the server only fails: the run stops with a clear error and
    # no result; once the server is back, the rerun sends only the requests still missing.
    stub_server.reply = lambda body: "[[A]]"
    stub_server.script = [("reply",)] * 3
    stub_server.default = ("status", 500)
    out = tmp_path / "crash"
    argv = ["judge", "--models", f"m={tiny_ws['model2']}", "--baseline", f"b={tiny_ws['model']}",
            "--questions", "sentiment:test", "--max-questions", "3", "--judge-base-url", stub_server.url,
            "--judge-model", "stub-judge", "--max-retries", "1", "--backoff", "0.01", "--concurrency", "1",
            "--out", str(out), *FAST]
    assert main(argv) == 2
    assert "still failed after 1 retries" in capsys.readouterr().err
    assert not (out / "results.json").exists() and len(list((out / "cache").rglob("*.json"))) == 3
    stub_server.default = ("reply",)
    before = len(stub_server.requests)
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    stats = res["requests"]["judge"]
    # 3 questions x 2 orders = 6 judgments: the 3 cached ones cost nothing. (Two tiny-model
    # answers can coincide, making both orders one request: hence <= and >=.)
    assert stats["cache_hits"] >= 3 and stats["cache_hits"] + stats["completed"] == 6
    assert len(stub_server.requests) - before == stats["requests"] == stats["completed"] <= 3
    assert res["pairwise"]["m"]["ties"] == 3
