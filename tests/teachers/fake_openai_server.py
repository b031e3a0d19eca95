"""A scripted OpenAI-compatible ``/v1/chat/completions`` server for the teacher tests.

It answers like DeepSeek-R1 (``reasoning_content`` apart from ``content``, usage with reasoning tokens)
and injects the faults an API really produces, on a script per question:

- ``"429"``       rate limited, with a ``Retry-After`` header (``retry_after`` seconds)
- ``"500"``/``"503"`` server errors
- ``"400"``/``"401"`` non-retryable errors (401 echoes the key it got, as careless servers do)
- ``"timeout"``   hold the request longer than the client's timeout, then drop it
- ``"drop"``      close the connection without any response
- ``"truncate"``  send a 200 whose body stops halfway (fewer bytes than Content-Length)
- ``"badjson"``   send a complete 200 whose body is not valid JSON
- ``"crash"``     the whole server dies mid-run (listening socket closed, connections reset)

Besides the per-question script, ``stall_after=N`` makes every request after the N-th successful
one hang until ``release()`` (used to SIGKILL a client at a known point), and ``crash_after=N``
crashes the server after N successful responses.

Built on ``http.server`` (stdlib) in a thread so the tests need no extra dependency and can read
the request counters directly. Run ``python tests/teachers/fake_openai_server.py`` to serve by hand.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TEST_KEY = "sk-test-THIS-KEY-MUST-NEVER-BE-LOGGED-0123456789"


def default_answer(question: str) -> tuple[str, str]:
    """(content, reasoning_content) for a question; the answer is the last number in the question.

    An ``answer_fn`` may also return (content, reasoning_content, finish_reason), e.g. ``"length"``
    with an empty content: DeepSeek-R1 hitting max_tokens inside its reasoning."""
    nums = re.findall(r"\d+", question)
    ans = nums[-1] if nums else "0"
    reasoning = f"The user wants the answer. Hmm, let me check the numbers. It must be {ans}."
    content = (
        "I will reason step by step and put the final answer in a box as instructed.\n"
        f"First, look at the question: the key quantity is {ans}.\n"
        f"So the result is {ans}.\n\n"
        f"**Final Answer**\n\\boxed{{{ans}}}"
    )
    return content, reasoning


class FakeOpenAIServer:
    """Start with ``start()`` (returns the base URL ``http://127.0.0.1:PORT/v1``), stop with ``stop()``."""

    def __init__(
        self,
        *,
        api_key: str | None = TEST_KEY,
        answer_fn=default_answer,
        faults: dict[str, list[str]] | None = None,
        retry_after: str = "1",
        hang_s: float = 5.0,
        stall_after: int | None = None,
        crash_after: int | None = None,
        delay_s: float = 0.0,
    ):
        self.api_key = api_key
        self.answer_fn = answer_fn
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.stall_after = stall_after
        self.crash_after = crash_after
        self.delay_s = delay_s
        self.requests: Counter[str] = Counter()  # question -> requests received
        self.successes: Counter[str] = Counter()  # question -> 200 responses fully sent
        self.log: list[dict] = []  # {t (arrival), question, outcome}
        self.usage_sent: list[dict] = []  # usage of every 200 sent
        self.crashed = False
        self.stalling = 0  # requests hanging right now (stall_after)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.base_url

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def release(self) -> None:
        """Stop stalling: hanging requests are dropped, later ones answered normally."""
        self.stall_after = None
        self._release.set()

    def crash(self) -> None:
        if self.crashed:
            return
        self.crashed = True
        httpd = self._httpd
        threading.Thread(target=httpd.shutdown, daemon=True).start()
        httpd.socket.close()

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None and not self.crashed:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def total_successes(self) -> int:
        return sum(self.successes.values())

    def outcomes(self, question: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(e["t"], e["outcome"]) for e in self.log if e["question"] == question]

    # -- bookkeeping used by the handler -----------------------------------------------------------
    def _next_fault(self, user: str) -> str | None:
        with self._lock:
            for key, script in self.faults.items():
                if key in user and script:
                    return script.pop(0)
        return None

    def _record(self, question: str, outcome: str, t: float, usage: dict | None = None) -> None:
        with self._lock:
            self.log.append({"t": t, "question": question, "outcome": outcome})
            if outcome == "200":
                self.successes[question] += 1
                self.usage_sent.append(usage)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs

    def log_message(self, *args) -> None:  # silence stderr noise
        pass

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # health / models, like vllm serve
        if self.path.rstrip("/") in ("/health", "/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake-r1", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        fake = self.fake
        t0 = time.monotonic()
        length = int(self.headers.get("Content-Length", 0))
        req = json.loads(self.rfile.read(length) or b"{}")
        if fake.crashed:
            return self._drop()
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        user = next((m["content"] for m in reversed(req.get("messages", [])) if m.get("role") == "user"), "")
        with fake._lock:
            fake.requests[user] += 1

        auth = self.headers.get("Authorization", "")
        if fake.api_key is not None and auth != f"Bearer {fake.api_key}":
            fake._record(user, "401", t0)
            got = auth.removeprefix("Bearer ")
            return self._json(
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {got}",
                        "type": "authentication_error",
                        "code": "invalid_api_key",
                    }
                },
            )

        if fake.stall_after is not None and fake.total_successes >= fake.stall_after:
            fake._record(user, "stall", t0)
            with fake._lock:
                fake.stalling += 1
            fake._release.wait(60)
            with fake._lock:
                fake.stalling -= 1
            return self._drop()

        fault = fake._next_fault(user)
        if fault is not None:
            fake._record(user, fault, t0)
        if fault == "429":
            return self._json(
                429,
                {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                {"Retry-After": fake.retry_after},
            )
        if fault in ("500", "503"):
            return self._json(
                int(fault), {"error": {"message": "The server had an error", "type": "server_error"}}
            )
        if fault == "400":
            return self._json(
                400, {"error": {"message": "Invalid request: bad max_tokens", "type": "invalid_request"}}
            )
        if fault == "401":
            got = auth.removeprefix("Bearer ")
            return self._json(
                401,
                {"error": {"message": f"Incorrect API key provided: {got}", "type": "authentication_error"}},
            )
        if fault == "timeout":
            fake._release.wait(fake.hang_s)
            return self._drop()
        if fault == "drop":
            return self._drop()
        if fault == "crash":
            fake.crash()
            return self._drop()

        if fake.delay_s:
            time.sleep(fake.delay_s)
        answer = fake.answer_fn(user)  # (content, reasoning) or (content, reasoning, finish_reason)
        body = _completion(req, *answer)
        if fault == "truncate":
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw[: len(raw) // 2])
            self.wfile.flush()
            return self._drop()
        if fault == "badjson":
            raw = json.dumps(body).encode()[:-7]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return None
        self._json(200, body)
        fake._record(user, "200", t0, body["usage"])
        if fake.crash_after is not None and fake.total_successes >= fake.crash_after:
            fake.crash()


def _completion(req: dict, content: str, reasoning: str | None, finish_reason: str = "stop") -> dict:
    prompt_tokens = sum(len(m.get("content", "").split()) for m in req.get("messages", []))
    content_tokens = len(content.split())
    reasoning_tokens = len(reasoning.split()) if reasoning else 0
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", "fake"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": content_tokens + reasoning_tokens,
            "total_tokens": prompt_tokens + content_tokens + reasoning_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--no-auth", action="store_true", help="accept any API key")
    args = ap.parse_args()
    srv = FakeOpenAIServer(api_key=None if args.no_auth else TEST_KEY)
    print(f"serving on {srv.start(args.port)} (key {'any' if args.no_auth else TEST_KEY})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
