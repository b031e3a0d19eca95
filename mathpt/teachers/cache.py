"""A durable, append-only cache of teacher completions, so no completed API call is paid for twice.

One JSON line per finished completion, keyed by (model, prompt hash, sample index). Each line is
flushed and fsynced before the caller moves on, so a run killed at any moment loses at most the calls
still in flight. A line torn by a kill mid-write can only be the last one (lines are written one at a
time, in order); it is cut off on the next open. A malformed line anywhere else is corruption and
fails loudly with ``file:line`` instead of being skipped (skipping would silently re-pay for it).

The "prompt hash" covers everything that changes what the teacher is asked (the messages and the
sampling parameters), so changing the instruction or ``max_tokens`` asks again while changing
concurrency, timeouts or prices does not.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from mathpt.io import DataError, MathptError, sha256_text


def prompt_hash(messages: list[dict], params: dict[str, Any]) -> str:
    """A stable hash of a request's messages and sampling parameters (not model, not sample index)."""
    return sha256_text(json.dumps({"messages": messages, "params": params}, sort_keys=True))[:32]


def cache_key(model: str, phash: str, sample_index: int) -> str:
    return f"{model}|{phash}|{sample_index}"


class CompletionCache:
    """``key -> record`` backed by one jsonl file; use as a context manager (holds an exclusive lock).

    The lock (``flock`` on ``<file>.lock``) stops two runs from sharing one cache and both paying for
    the same missing calls.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._f = None
        self._lock_f = None

    def __enter__(self) -> CompletionCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_f = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock_f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_f.close()
            raise MathptError(f"{self.path}: cache is in use by another teacher run (lock held)") from None
        self._load()
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
        if self._lock_f is not None:
            fcntl.flock(self._lock_f, fcntl.LOCK_UN)
            self._lock_f.close()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A kill mid-write left a partial last line: cut it off (its call was never recorded).
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{self.path}:{lineno}: corrupt cache line (not a completion record); "
                    "fix or remove that line, the rest of the cache stays valid"
                ) from None
            self.records[key] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        """Append ``record`` (must hold ``key``) and fsync before returning."""
        if self._f is None:
            raise RuntimeError("CompletionCache used outside its `with` block")
        self._f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[record["key"]] = record
