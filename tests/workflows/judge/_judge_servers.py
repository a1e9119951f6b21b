"""Helpers of the judge tests: a scripted stub server and a free-port finder.

The stub (stdlib ``http.server`` in a thread, on 127.0.0.1) answers with what a test
scripts, in turn: an HTTP status, a garbage body, a delay past the client's timeout, or a
chat completion whose text a function computes from the request. It tests our error paths,
not the protocol. Imported as a top-level module (the test folder has no ``__init__.py``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    """A scripted OpenAI-compatible stub.

    ``script`` holds one behaviour per chat request, consumed in order; once it is empty
    ``default`` answers. A behaviour is ``("status", code)``, ``("garbage",)``,
    ``("sleep", seconds)`` (then a normal reply, too late) or ``("reply", text)``; a
    normal reply's text is ``reply(request_json)``. ``requests`` records every chat
    request as ``(body, authorization header)``.
    """

    def __init__(self, models=("stub-judge",), reply=lambda body: "Rating: [[7]]"):
        self.models, self.reply = list(models), reply
        self.script: list[tuple] = []
        self.default = ("reply",)
        self.requests: list[tuple[dict, str]] = []
        self.active = self.max_active = 0   # chat requests being handled now / at most
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code, body: bytes, ctype="application/json"):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout case)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "stub"}
                                                       for m in stub.models]}
                    self._send(200, json.dumps(data).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub.lock:
                    stub.requests.append((body, self.headers.get("Authorization", "")))
                    step = stub.script.pop(0) if stub.script else stub.default
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                try:
                    self._answer(step, body)
                finally:
                    with stub.lock:
                        stub.active -= 1

            def _answer(self, step, body):
                if step[0] == "status":
                    self._send(step[1], json.dumps({"error": {"message": f"stub {step[1]}"}}).encode())
                    return
                if step[0] == "garbage":
                    self._send(200, b"<html>this is not json")
                    return
                if step[0] == "sleep":
                    time.sleep(step[1])
                text = step[1] if step[0] == "reply" and len(step) > 1 else stub.reply(body)
                data = {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(data).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
