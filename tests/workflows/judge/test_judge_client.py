"""The judge client's error paths, against a local stub that fails on purpose."""

from __future__ import annotations

import threading

import pytest

from _judge_servers import free_port

pytest.importorskip("openai")

from aligndistil.workflows.judge.client import ChatClient, JudgeError, request_key  # noqa: E402

MSGS = [{"role": "user", "content": "Grade this."}]
SECRET = "sk-test-DO-NOT-WRITE-7f3a9c"


def _client(stub, tmp_path, **kw):
    args = dict(cache_dir=tmp_path / "cache", timeout=0.5, backoff=0.01, max_retries=5)
    args.update(kw)
    return ChatClient(stub.url, "stub-judge", **args)


def test_429_500_garbage_and_timeout_in_turn_are_retried_then_cached(stub_server, tmp_path):
    stub_server.script = [("status", 429), ("status", 500), ("garbage",), ("sleep", 1.5)]
    c = _client(stub_server, tmp_path)
    assert c.complete(MSGS) == "Rating: [[7]]"
    assert len(stub_server.requests) == 5                 # four failures, then the answer
    assert c.stats.retries == {"http_429": 1, "http_500": 1, "malformed": 1, "timeout": 1}
    assert (c.stats.requests, c.stats.completed, c.stats.cache_hits) == (5, 1, 0)
    # The same request again costs nothing: it comes from the disk cache.
    again = _client(stub_server, tmp_path)
    assert again.complete(MSGS) == "Rating: [[7]]"
    assert len(stub_server.requests) == 5 and again.stats.cache_hits == 1
    # Another temperature is another request.
    again.complete(MSGS, temperature=0.5)
    assert len(stub_server.requests) == 6


def test_a_server_that_keeps_failing_is_a_clear_error_after_the_retries(stub_server, tmp_path):
    stub_server.default = ("status", 503)
    c = _client(stub_server, tmp_path, max_retries=2)
    with pytest.raises(JudgeError) as e:
        c.complete(MSGS)
    msg = str(e.value)
    assert stub_server.url in msg and "HTTP 503" in msg and "2 retries" in msg
    assert len(stub_server.requests) == 3
    assert not list((tmp_path / "cache").rglob("*.json"))      # nothing cached for a failure


def test_client_errors_are_not_retried_and_never_show_the_key(stub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    stub_server.script = [("status", 401)]
    c = _client(stub_server, tmp_path, api_key_env="JUDGE_TEST_KEY")
    with pytest.raises(JudgeError) as e:
        c.complete(MSGS)
    assert len(stub_server.requests) == 1
    assert "JUDGE_TEST_KEY" in str(e.value) and SECRET not in str(e.value) and SECRET not in repr(c)
    stub_server.script = [("status", 400)]
    with pytest.raises(JudgeError, match="HTTP 400"):
        c.complete(MSGS)
    assert len(stub_server.requests) == 2


def test_the_key_is_sent_but_never_written(stub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    c = _client(stub_server, tmp_path, api_key_env="JUDGE_TEST_KEY")
    c.complete(MSGS)
    assert stub_server.requests[-1][1] == f"Bearer {SECRET}"
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(SECRET not in p.read_text() for p in files)


def test_cache_key_is_the_content_not_the_server(stub_server, tmp_path):
    req = {"model": "m", "messages": MSGS, "params": {"temperature": 0.0, "max_tokens": 5}}
    assert request_key(req) == request_key(dict(reversed(list(req.items()))))
    assert request_key(req) != request_key({**req, "model": "other"})
    c = _client(stub_server, tmp_path)
    c.complete(MSGS)
    other = ChatClient(stub_server.url.replace("127.0.0.1", "localhost"), "stub-judge", cache_dir=tmp_path / "cache")
    other.complete(MSGS)
    assert len(stub_server.requests) == 1 and other.stats.cache_hits == 1


def test_check_names_the_url_when_nothing_listens_and_the_models_when_one_is_unknown(stub_server, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeError, match=f"no OpenAI-compatible server answers at {url}"):
        ChatClient(url, "x", timeout=2).check()
    with pytest.raises(JudgeError, match=r"has no model 'gpt-9'; it serves \['stub-judge'\]"):
        ChatClient(stub_server.url, "gpt-9").check()
    assert ChatClient(stub_server.url, "stub-judge").check() == ["stub-judge"]


def test_map_keeps_order_and_bounds_concurrency(stub_server, tmp_path):
    stub_server.default = ("sleep", 0.15)
    stub_server.reply = lambda body: body["messages"][0]["content"].upper()
    c = _client(stub_server, tmp_path, concurrency=2, timeout=5)
    items = [f"q{i}" for i in range(6)]
    out = c.map(lambda s: c.complete([{"role": "user", "content": s}]), items)
    assert out == [s.upper() for s in items]
    assert stub_server.max_active == 2


def test_map_raises_the_first_error_and_keeps_finished_replies(stub_server, tmp_path):
    lock = threading.Lock()
    calls = []

    def fn(s):
        with lock:
            calls.append(s)
        if s == "bad":
            raise JudgeError("boom")
        return c.complete([{"role": "user", "content": s}])

    c = _client(stub_server, tmp_path, concurrency=1)
    with pytest.raises(JudgeError, match="boom"):
        c.map(fn, ["a", "bad", "c"])
    assert calls == ["a", "bad"] and len(list((tmp_path / "cache").rglob("*.json"))) == 1
