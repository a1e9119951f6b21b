"""Fixtures of the judge tests: a scripted stub server and a real llama.cpp server.

The stub is :class:`_judge_servers.StubServer`. The real server is llama-cpp-python's
OpenAI-compatible server serving the embedded SmolLM2-135M-Instruct GGUF: it is what the
judge is for. It is skipped, with the reason, when it cannot start, except under CI
(``CI=true``), where setup.sh installs it and a skip would hide a broken install: there
it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from _judge_servers import StubServer, free_port


@pytest.fixture
def stub_server():
    """A fresh :class:`StubServer` per test (scripts and counters start empty)."""
    pytest.importorskip("openai")
    s = StubServer()
    yield s
    s.close()


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the llama.cpp judge server must run in CI (scripts/setup.sh installs it): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """``{"url", "model"}`` of a llama.cpp server on 127.0.0.1 serving SmolLM2 as ``smollm2``;
    stopped at the end of the session."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        _unavailable("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'; see scripts/setup.sh)")
    if importlib.util.find_spec("openai") is None:
        _unavailable("the openai package is not installed (pip install 'aligndistil[judge]')")
    from aligndistil.model.loading import ModelLoadError, find_default_gguf

    try:
        gguf = find_default_gguf()
    except ModelLoadError as exc:
        _unavailable(str(exc))
    port = free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--verbose", "False"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                _unavailable(f"the llama.cpp server exited with code {proc.returncode}: "
                             f"{log.read_text(errors='replace')[-800:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                _unavailable(f"the llama.cpp server did not answer within 120 s: {log.read_text(errors='replace')[-800:]}")
            time.sleep(0.5)
        yield {"url": url, "model": "smollm2", "log": str(log)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
