"""A chat client for any OpenAI-compatible server: bounded concurrency, retries, a disk cache.

Judging a model on MT-Bench is hundreds of requests to a server that may rate-limit,
fail, hang or answer nonsense, and that may cost money per request. So:

* every request and its reply are cached on disk under a key computed from the request's
  content (model, messages, sampling settings), never from where it was sent or with which
  key: a rerun, or a run that crashed half way, pays only for what it has not got yet;
* transient failures (HTTP 408/409/429/5xx, timeouts, lost connections, a reply that is
  not a chat completion) are retried with exponential backoff and jitter, honouring the
  server's ``Retry-After`` when it gives one; other errors (a bad key, an unknown model)
  fail at once, since retrying cannot fix them;
* at most ``concurrency`` requests are in flight (a thread pool; the work is I/O bound).

The API key is read from an environment variable (``OPENAI_API_KEY`` unless told
otherwise) and handed to the ``openai`` client only: it is never part of a cache key, a
cache file, a log line or an error message. Local servers accept any key, so a missing
variable is not an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from aligndistil.errors import AlignDistilError
from aligndistil.fileio import atomic_write_text

__all__ = ["ChatClient", "ClientStats", "JudgeError", "request_key"]

T = TypeVar("T")
R = TypeVar("R")

#: What ``openai`` gets as the key when the variable is unset: local servers ignore it.
_NO_KEY = "sk-no-key-required"
#: Statuses worth retrying: request timeout, conflict, rate limit (and any 5xx, below).
_RETRY_STATUSES = {408, 409, 429}


class JudgeError(AlignDistilError, RuntimeError):
    """The judge server cannot be used: unreachable, unknown model, refused key, or a
    request still failing after every retry. Results already cached stay on disk."""


class _Malformed(Exception):
    """A 2xx reply that is not a chat completion (garbage body, no choices, no text)."""


@dataclass
class ClientStats:
    """Counts for the report: what was sent, what came from the cache, what went wrong."""

    requests: int = 0        # HTTP requests sent (retries included)
    cache_hits: int = 0
    completed: int = 0       # replies obtained from the server and cached
    retries: dict = field(default_factory=dict)   # kind of failure -> retries it caused

    def as_dict(self) -> dict:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "completed": self.completed,
                "retries": dict(sorted(self.retries.items()))}


def request_key(request: dict) -> str:
    """sha256 of the request's canonical JSON: equal content, equal key."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _openai():
    try:
        import openai
    except ImportError as exc:
        raise ImportError(
            "the judge talks to its server through the openai package: pip install 'openai>=1.40' "
            "(or pip install 'aligndistil[judge]')"
        ) from exc
    return openai


class ChatClient:
    """Chat completions from one model of one OpenAI-compatible server.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8080/v1``.
        model: the model name the server knows.
        api_key_env: the environment variable holding the key (read once, here).
        cache_dir: where request/reply pairs are cached (``None``: no cache).
        concurrency: requests in flight at most, in :meth:`map`.
        max_retries: retries of one request after a transient failure.
        timeout: seconds before one HTTP request is abandoned (and retried).
        backoff, max_backoff: the n-th retry waits ``min(max_backoff, backoff * 2**n)``
            seconds, times a random factor in [0.5, 1] so that parallel clients spread out.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 cache_dir: str | os.PathLike | None = None, concurrency: int = 4, max_retries: int = 5,
                 timeout: float = 120.0, backoff: float = 1.0, max_backoff: float = 30.0):
        if concurrency <= 0:
            raise ValueError(f"concurrency must be > 0, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        openai = _openai()
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.stats = ClientStats()
        # The openai client's own retries are off: ours count and report every retry.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or _NO_KEY,
                                     max_retries=0, timeout=timeout)
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def __repr__(self) -> str:  # never the key
        return f"ChatClient({self.base_url!r}, model={self.model!r})"

    # -- checks ------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Ask the server which models it serves; fail clearly unless ``model`` is one.

        Run before any work, so that a wrong URL or model name stops the run with nothing
        written. A server without ``/models`` (404) is let through: the first real
        request will then say what is wrong. Returns the served model names.
        """
        openai = _openai()
        try:
            names = [m.id for m in self._client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise JudgeError(f"no OpenAI-compatible server answers at {self.base_url} "
                             f"({type(exc).__name__}); start one or fix the base URL") from None
        except openai.NotFoundError:
            return []
        except openai.AuthenticationError:
            raise JudgeError(f"the server at {self.base_url} refused the API key "
                             f"(read from the environment variable {self.api_key_env})") from None
        except openai.APIStatusError as exc:
            raise JudgeError(f"the server at {self.base_url} answered HTTP {exc.status_code} "
                             "to GET /models") from None
        except Exception as exc:  # noqa: BLE001 - a non-OpenAI server answering garbage
            raise JudgeError(f"the server at {self.base_url} did not answer GET /models like an "
                             f"OpenAI-compatible server ({type(exc).__name__})") from None
        if names and self.model not in names:
            raise JudgeError(f"the server at {self.base_url} has no model {self.model!r}; it serves {names}")
        return names

    # -- one request -------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir is not None else None

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 512,
                 seed: int | None = None) -> str:
        """The text of the assistant's reply to ``messages`` (from the cache if there).

        Raises:
            JudgeError: a non-retryable error, or a transient one outlasting every retry.
        """
        params = {"temperature": float(temperature), "max_tokens": int(max_tokens)}
        if seed is not None:
            params["seed"] = int(seed)
        request = {"model": self.model, "messages": messages, "params": params}
        key = request_key(request)
        path = self._cache_path(key)
        # One lock per key: two threads asking the same thing send it once.
        with self._key_lock(key):
            if path is not None and path.is_file():
                try:
                    reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
                    with self._lock:
                        self.stats.cache_hits += 1
                    return reply
                except (ValueError, KeyError):
                    pass  # a damaged entry is fetched again and overwritten
            reply = self._send(messages, params)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"key": key, "request": request, "reply": reply},
                                                   ensure_ascii=True, indent=1) + "\n")
            with self._lock:
                self.stats.completed += 1
            return reply

    def _send(self, messages: list[dict], params: dict) -> str:
        openai = _openai()
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._lock:
                self.stats.requests += 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **params)
                try:
                    text = raw.parse().choices[0].message.content
                except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed reply
                    raise _Malformed(type(exc).__name__) from None
                if not isinstance(text, str):
                    raise _Malformed("no message text")
                return text
            except _Malformed as exc:
                kind, last = "malformed", f"a reply that is not a chat completion ({exc})"
            except openai.APITimeoutError:
                kind, last = "timeout", "a timeout"
            except openai.APIConnectionError as exc:
                kind, last = "connection", f"a lost connection ({type(exc).__name__})"
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status not in _RETRY_STATUSES and status < 500:
                    raise JudgeError(self._status_message(exc)) from None
                kind, last = f"http_{status}", f"HTTP {status}"
                retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
            if attempt == self.max_retries:
                break
            with self._lock:
                self.stats.retries[kind] = self.stats.retries.get(kind, 0) + 1
            time.sleep(self._delay(attempt, retry_after))
        raise JudgeError(f"the judge request to {self.base_url} (model {self.model!r}) still failed after "
                         f"{self.max_retries} retries; the last failure was {last}. Replies obtained so far "
                         "are cached: rerun to continue")

    def _status_message(self, exc) -> str:
        status = exc.status_code
        if status == 401:
            return (f"the server at {self.base_url} refused the API key (HTTP 401; read from the "
                    f"environment variable {self.api_key_env})")
        if status == 404:
            return f"the server at {self.base_url} has no model {self.model!r} (HTTP 404)"
        body = getattr(exc, "body", None)
        detail = json.dumps(body)[:300] if body is not None else ""
        return f"the server at {self.base_url} rejected the request: HTTP {status} {detail}".rstrip()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)

    # -- many requests -----------------------------------------------------------------

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_done: Callable[[], None] | None = None) -> list[R]:
        """``[fn(x) for x in items]`` with at most ``concurrency`` calls at once, in order.

        The first error is raised once the calls already running have finished (their
        replies are cached); calls not yet started are cancelled.
        """
        items = list(items)
        if self.concurrency == 1 or len(items) <= 1:
            out = []
            for x in items:
                out.append(fn(x))
                if on_done:
                    on_done()
            return out
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(fn, x) for x in items]
            try:
                out = []
                for f in futures:
                    out.append(f.result())
                    if on_done:
                        on_done()
                return out
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
