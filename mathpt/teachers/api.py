"""Teacher completions from any OpenAI-compatible chat API (DeepSeek-R1, OpenAI, a local ``vllm serve``).

Calls cost money and fail in many ways, so this module is mostly about not wasting them:

- Every finished completion is appended, fsynced, to a ``CompletionCache`` before anything else
  happens; a killed run restarts and asks only for what is missing.
- Retries: the openai client's own retries are switched off (``max_retries=0``) and the policy is
  ours, built on tenacity (a maintained library that snakemake already depends on): retry 408/409/
  429/5xx, timeouts, dropped connections and malformed bodies with full-jitter exponential backoff
  (``wait_random_exponential``), waiting at least the server's ``Retry-After``; any other HTTP error
  (400, 401, 403, 404, 422...) stops the whole run at once with a message that says what to fix:
  no new request and no retry is made after it; calls already in flight are let finish and are
  cached, since the provider bills them anyway (Ctrl-C, in contrast, cancels them).
- The API key is read from the environment variable named by ``api_key_env`` (or a ``.env`` file),
  checked before the first request, and scrubbed from every message we raise or log
  (``mathpt.secrets.redact``); it is never stored in the cache, the summary or a config dump.
- Accounting: prompt / completion / reasoning / cached-prompt tokens and a cost estimate from the
  ``prices_per_million`` table in config, shown live on the progress bar.

DeepSeek's ``reasoning_content`` (the chain of thought before the answer) is kept apart from the
final ``content`` in every record; ``mathpt.teachers.cleaning`` decides what goes into SFT.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mathpt.io import MathptError
from mathpt.secrets import is_secret_key, redact
from mathpt.teachers.cache import CompletionCache, cache_key, prompt_hash

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx


class TeacherAPIError(MathptError):
    """The teacher API failed in a way retrying cannot fix (or retries ran out). Key never included."""


class MalformedResponse(Exception):
    """A 200 whose body is not a usable chat completion (no choices, bad JSON): retried."""


@dataclass(frozen=True)
class APITeacherSettings:
    """Teacher settings read from the ``teacher`` config section (defaults = DeepSeek-R1)."""

    base_url: str = "https://api.deepseek.com"
    model: str = "deepseek-reasoner"
    api_key_env: str | None = "DEEPSEEK_API_KEY"  # None/"" = no key (a local vllm serve without --api-key)
    dotenv_path: str = ".env"
    samples_per_prompt: int = 1
    max_tokens: int = 2048
    temperature: float | None = 0.6  # None = server default (deepseek-reasoner ignores it anyway)
    top_p: float | None = None
    concurrency: int = 32
    request_timeout_s: float = 600.0
    max_retries: int = 8  # retries per call after the first attempt
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 600.0  # longest Retry-After we honour; longer waits are capped
    instruction: str = DEFAULT_INSTRUCTION  # must contain {question}
    system_prompt: str | None = None  # DeepSeek advises none for R1: all instructions go in the user turn
    prices_per_million: dict = field(default_factory=dict)  # USD: {prompt, completion, cached_prompt}
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> APITeacherSettings:
        """Pick this class's keys out of ``cfg`` (other teacher keys such as ``kind``/``keep`` are ignored)."""
        refuse_credentials(cfg)
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in cfg.items() if k in known})
        if "{question}" not in s.instruction:
            raise MathptError("config key 'teacher.instruction': must contain the placeholder {question}")
        for name in ("samples_per_prompt", "max_tokens", "concurrency"):
            if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
                raise MathptError(
                    f"config key 'teacher.{name}': expected a positive integer, got {getattr(s, name)!r}"
                )
        if not s.request_timeout_s or s.request_timeout_s <= 0:
            raise MathptError(
                f"config key 'teacher.request_timeout_s': must be > 0, got {s.request_timeout_s!r}"
            )
        bad = set(s.prices_per_million) - {"prompt", "completion", "cached_prompt"}
        if bad:
            raise MathptError(
                f"config key 'teacher.prices_per_million': unknown entries {sorted(bad)}; "
                "expected prompt, completion and optionally cached_prompt (USD per 1M tokens)"
            )
        return s

    def request_params(self) -> dict[str, Any]:
        """The sampling parameters sent with every request (part of the cache's prompt hash)."""
        p: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            p["temperature"] = self.temperature
        if self.top_p is not None:
            p["top_p"] = self.top_p
        return p


def refuse_credentials(cfg: dict) -> None:
    """Config files end up in provenance, W&B and git: a key there is refused (its value never echoed)."""
    leaked = [k for k in cfg if is_secret_key(k)]
    if leaked:
        raise MathptError(
            f"config key 'teacher.{leaked[0]}': do not put credentials in config; put the key in "
            "the environment variable named by teacher.api_key_env (or a .env file)"
        )


def load_api_key(s: APITeacherSettings) -> str:
    """The API key from ``$api_key_env``, else from the ``.env`` file; fail before any request if absent."""
    if not s.api_key_env:
        return "EMPTY"  # servers without auth (vllm serve) accept any key
    key = os.environ.get(s.api_key_env)
    dotenv = Path(s.dotenv_path)
    if not key and dotenv.is_file():
        from dotenv import dotenv_values

        key = dotenv_values(dotenv).get(s.api_key_env)
    if not key:
        raise MathptError(
            f"config key 'teacher.api_key_env': environment variable {s.api_key_env} is not set and not "
            f"found in {dotenv.resolve()}; export it or copy .env.example to .env and fill it in"
        )
    return key.strip()


def build_messages(question: str, s: APITeacherSettings) -> list[dict]:
    msgs = [{"role": "system", "content": s.system_prompt}] if s.system_prompt else []
    # str.replace, not str.format: the instruction contains braces (\boxed{}).
    return msgs + [{"role": "user", "content": s.instruction.replace("{question}", question)}]


def estimate_cost(usage: dict, prices: dict) -> float | None:
    """USD for token counts under a per-million price table; None when no prices are configured.

    Reasoning tokens are part of ``completion_tokens`` (OpenAI and DeepSeek both bill them as output),
    so they are not added again. Cached prompt tokens use ``cached_prompt`` if given, else ``prompt``.
    """
    if not prices:
        return None
    cached = usage.get("cached_prompt_tokens", 0)
    p_prompt = prices.get("prompt", 0.0)
    return (
        (usage.get("prompt_tokens", 0) - cached) * p_prompt
        + cached * prices.get("cached_prompt", p_prompt)
        + usage.get("completion_tokens", 0) * prices.get("completion", 0.0)
    ) / 1e6


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds from a response's ``Retry-After-Ms`` / ``Retry-After`` (seconds or HTTP date), if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            sec = float(value) * scale
            return sec if math.isfinite(sec) and sec >= 0 else None
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


def is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    # Timeouts are APIConnectionError too; truncated bodies surface as connection errors,
    # unparseable 200 bodies as JSONDecodeError / APIResponseValidationError.
    return isinstance(
        exc,
        openai.APIConnectionError
        | openai.APIResponseValidationError
        | json.JSONDecodeError
        | MalformedResponse,
    )


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "status_code", None)
    if code is not None:
        return str(code)
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return "malformed"


_HINTS = {
    400: "the request was rejected; check teacher.model, max_tokens, temperature and the instruction",
    401: "authentication failed; check the key in ${env}",
    403: "permission denied; check the account behind ${env} (balance, model access)",
    404: "not found; check teacher.base_url and teacher.model",
    402: "payment required; check the account balance",
    422: "the request was rejected; check teacher.model and the sampling parameters",
}


def _describe(exc: BaseException, s: APITeacherSettings, key: str) -> str:
    code = getattr(exc, "status_code", None)
    hint = _HINTS.get(code, "").replace("${env}", s.api_key_env or "the key variable")
    what = f"HTTP {code}" if code is not None else type(exc).__name__
    msg = f"{what} from {s.base_url} (model {s.model}): {exc}" + (f" -- {hint}" if hint else "")
    return redact(msg, [key])


@dataclass
class Accounting:
    """Running totals for one teacher run; ``as_dict`` is what the summary file shows."""

    prices: dict
    tokens_new: Counter = field(default_factory=Counter)  # paid for in this run
    tokens_all: Counter = field(default_factory=Counter)  # every completion in the output (incl. cached)
    calls_new: int = 0
    calls_cached: int = 0
    attempts: int = 0
    retries: Counter = field(default_factory=Counter)  # reason -> count
    finish_reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "calls_new": self.calls_new,
            "calls_cached": self.calls_cached,
            "http_attempts": self.attempts,
            "retries": dict(self.retries),
            "finish_reasons": dict(self.finish_reasons),
            "tokens": dict(self.tokens_all),
            "tokens_this_run": dict(self.tokens_new),
            "cost_usd": estimate_cost(self.tokens_all, self.prices),
            "cost_usd_this_run": estimate_cost(self.tokens_new, self.prices),
            "prices_per_million": dict(self.prices),
        }


def _usage(resp) -> dict:
    u = getattr(resp, "usage", None)
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0, "cached_prompt_tokens": 0}
    details = getattr(u, "completion_tokens_details", None)
    pdetails = getattr(u, "prompt_tokens_details", None)
    extra = getattr(u, "model_extra", None) or {}
    cached = getattr(pdetails, "cached_tokens", None) or extra.get("prompt_cache_hit_tokens") or 0
    return {
        "prompt_tokens": u.prompt_tokens or 0,
        "completion_tokens": u.completion_tokens or 0,
        "reasoning_tokens": getattr(details, "reasoning_tokens", None) or 0,
        "cached_prompt_tokens": cached,
    }


def _parse(resp) -> dict:
    if not getattr(resp, "choices", None):
        raise MalformedResponse("response has no choices")
    choice = resp.choices[0]
    msg = choice.message
    extra = getattr(msg, "model_extra", None) or {}
    # DeepSeek: reasoning_content; recent vllm reasoning parsers: reasoning.
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    return {
        "content": msg.content or "",
        "reasoning_content": reasoning,
        "finish_reason": choice.finish_reason or "unknown",
        "usage": _usage(resp),
        "response_model": getattr(resp, "model", None),
    }


class _Stopped(Exception):
    """Another call hit a fatal error: do not retry, do not start anything new."""


async def _call_with_retries(
    client,
    s: APITeacherSettings,
    messages: list[dict],
    acct: Accounting,
    key: str,
    label: str,
    stop: asyncio.Event,
) -> dict:
    """One chat completion under our retry policy; raises TeacherAPIError when it cannot succeed."""
    from tenacity import (
        AsyncRetrying,
        RetryCallState,
        retry_if_exception,
        stop_after_attempt,
        wait_random_exponential,
    )

    backoff = wait_random_exponential(multiplier=s.backoff_base_s, max=s.backoff_max_s)

    def wait(rs: RetryCallState) -> float:
        ra = retry_after_s(rs.outcome.exception())
        if ra is not None:  # the server said when: wait that long, plus jitter so callers don't stampede
            return min(ra, s.max_retry_after_s) + random.uniform(0, s.backoff_base_s)
        return backoff(rs)

    def before_sleep(rs: RetryCallState) -> None:
        exc = rs.outcome.exception()
        acct.retries[_reason(exc)] += 1
        log.warning(
            "teacher %s: attempt %d failed (%s); retrying in %.1f s",
            label,
            rs.attempt_number,
            redact(f"{type(exc).__name__}: {exc}", [key]),
            rs.next_action.sleep,
        )

    async def sleep(seconds: float) -> None:  # a backoff ends early when the run is stopping
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    params = s.request_params()
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=wait,
            sleep=sleep,
            stop=stop_after_attempt(s.max_retries + 1),
            reraise=True,
            before_sleep=before_sleep,
        ):
            with attempt:
                if stop.is_set():
                    raise _Stopped
                acct.attempts += 1
                resp = await client.chat.completions.create(model=s.model, messages=messages, **params)
                return _parse(resp)
    except (asyncio.CancelledError, _Stopped):
        raise
    except Exception as exc:
        if is_retryable(exc):
            raise TeacherAPIError(
                f"teacher {label}: gave up after {s.max_retries + 1} attempts; last error: "
                + _describe(exc, s, key)
                + ". Completed calls are cached: rerun to resume."
            ) from None
        raise TeacherAPIError(
            f"teacher {label}: non-retryable error, stopping the run: " + _describe(exc, s, key)
        ) from None
    raise AssertionError("unreachable")


def run_api_teacher(
    s: APITeacherSettings, jobs: list[tuple[str, str]], cache_path: str | os.PathLike
) -> tuple[list[dict], dict]:
    """Complete every (row id, question) ``samples_per_prompt`` times, resuming from ``cache_path``.

    Returns the records in job order (sample index fastest) and the accounting dict. Raises
    TeacherAPIError on a non-retryable error or exhausted retries; what completed stays cached.
    """
    key = load_api_key(s)  # fail before the first request, and before touching the cache
    return asyncio.run(_run(s, jobs, cache_path, key))


async def _run(
    s: APITeacherSettings, jobs: list[tuple[str, str]], cache_path, key: str
) -> tuple[list[dict], dict]:
    import openai
    from tqdm.auto import tqdm

    acct = Accounting(prices=dict(s.prices_per_million))
    params = s.request_params()
    wanted: list[tuple[str, str, list[dict], int, str]] = []  # (cache key, row id, messages, sample, hash)
    for row_id, question in jobs:
        msgs = build_messages(question, s)
        ph = prompt_hash(msgs, params)
        for i in range(s.samples_per_prompt):
            wanted.append((cache_key(s.model, ph, i), row_id, msgs, i, ph))
    unique = {w[0]: w for w in wanted}  # a question asked twice (same messages) is paid for once

    with CompletionCache(cache_path) as cache:
        missing = [w for k, w in unique.items() if k not in cache]
        acct.calls_cached = len(unique) - len(missing)
        log.info(
            "teacher %s: %d completions wanted, %d cached, %d to request",
            s.model,
            len(wanted),
            acct.calls_cached,
            len(missing),
        )
        if missing:
            queue: asyncio.Queue = asyncio.Queue()
            for w in missing:
                queue.put_nowait(w)
            bar = tqdm(total=len(missing), desc=f"teacher {s.model}", unit="call", disable=not s.progress)
            client = openai.AsyncOpenAI(
                api_key=key, base_url=s.base_url, max_retries=0, timeout=s.request_timeout_s
            )

            stop = asyncio.Event()
            errors: list[TeacherAPIError] = []

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        ck, row_id, msgs, i, ph = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    try:
                        out = await _call_with_retries(client, s, msgs, acct, key, f"{row_id}#{i}", stop)
                    except _Stopped:
                        return
                    except TeacherAPIError as e:
                        if not stop.is_set():
                            # Stop at once: no new request and no retry from now on. Calls already in
                            # flight are let finish and cached, because they are paid for anyway.
                            log.error("%s -- stopping; letting calls in flight finish", e)
                            stop.set()
                        errors.append(e)
                        return
                    cache.put(
                        {
                            "key": ck,
                            "model": s.model,
                            "prompt_hash": ph,
                            "sample_index": i,
                            "row_id": row_id,
                            "created": time.time(),
                            **out,
                        }
                    )
                    acct.calls_new += 1
                    acct.tokens_new.update(out["usage"])
                    bar.update(1)
                    cost = estimate_cost(acct.tokens_new, acct.prices)
                    bar.set_postfix(
                        cost=f"${cost:.4f}" if cost is not None else "n/a",
                        retries=sum(acct.retries.values()),
                        refresh=False,
                    )

            tasks = [asyncio.create_task(worker()) for _ in range(min(s.concurrency, len(missing)))]
            try:
                await asyncio.gather(*tasks)
            finally:  # on Ctrl-C / cancellation: stop everything now
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                bar.close()
                await client.close()
            if errors:
                raise errors[0]
        records = [cache.get(w[0]) for w in wanted]
        for k in unique:  # tokens and cost of the distinct completions the output uses
            acct.tokens_all.update(cache.get(k)["usage"])
    for rec in records:
        acct.finish_reasons[rec["finish_reason"]] += 1
    return records, acct.as_dict()
