"""Start-up timing of a pipeline job: where the seconds before the first useful token go.

A job (``mathpt.pipeline.run_script``) names an events file in ``MATHPT_TIMING_FILE``; the job and
every process it spawns (eval shards, the inference worker, vLLM's engine core) inherit it and append
one JSON line per milestone with :func:`mark`. At the end the job folds the file into
``results/logs/timing/<job>.json`` (not a declared output: a side record the summary reads if present)
and logs one line. Milestones, each the first time any process of the job reached it:

- ``start``: the job's process was created (from the OS, so interpreter start-up counts);
- ``imports``: torch and the engine's library (vLLM, transformers) imported, before the engine;
- ``engine_ready``: the first inference engine (or lm-eval model) is built;
- ``first_output``: the first generation call returned (an upper bound on the first token);
- ``first_step``: the first training step was logged;
- ``end``: the job's main function returned.

Marking never fails a job: without the variable, or on a write error, it does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

ENV = "MATHPT_TIMING_FILE"
EVENTS = ("start", "imports", "engine_ready", "first_output", "first_step", "end")

log = logging.getLogger("mathpt")
_marked: set[str] = set()


def mark(event: str, once: bool = True) -> None:
    """Append ``event`` with the wall-clock time to the job's events file (once per process)."""
    path = os.environ.get(ENV)
    if not path or (once and event in _marked):
        return
    _marked.add(event)
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:  # short appends from several processes
            f.write(line)
    except OSError:
        pass


def process_start_time(pid: int | None = None) -> float:
    """When this process was created (seconds since the epoch), so interpreter start-up counts."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no psutil, or no such process: the best later estimate
        return time.time()


def read_events(path: str | os.PathLike) -> dict[str, float]:
    """The first time of each event in an events file; unreadable lines are skipped."""
    first: dict[str, float] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return first
    for line in lines:
        try:
            row = json.loads(line)
            event, t = str(row["event"]), float(row["t"])
        except (ValueError, KeyError, TypeError):
            continue
        first[event] = min(t, first.get(event, t))
    return first


def job_timing(job: str, events: dict[str, float]) -> dict[str, Any]:
    """Seconds since ``start`` of each milestone reached, plus the gaps between consecutive ones."""
    start = events.get("start")
    if start is None:
        raise ValueError("timing events have no 'start'")
    since = {e: round(events[e] - start, 3) for e in EVENTS if e in events}
    extra = {e: round(t - start, 3) for e, t in events.items() if e not in EVENTS}
    return {"job": job, "start_time": start, "since_start_s": since, "other_events_s": extra}


def timing_path(log_path: str | os.PathLike) -> tuple[str, Path]:
    """(job name, timing file) for a job's log: ``<results>/logs/eval/base-gsm8k.log`` gives job
    ``eval/base-gsm8k`` and ``<results>/logs/timing/eval/base-gsm8k.json``; a log outside a ``logs``
    directory gets ``timing/<name>.json`` beside it."""
    p = Path(log_path)
    parts = p.parent.parts
    if "logs" in parts:
        i = len(parts) - 1 - parts[::-1].index("logs")
        root = Path(*parts[: i + 1])
        job = p.relative_to(root).with_suffix("").as_posix()
    else:
        root, job = p.parent, p.stem
    return job, root / "timing" / f"{job}.json"


def write_job_timing(log_path: str | os.PathLike, events_path: str | os.PathLike) -> dict[str, Any] | None:
    """Fold the events file into the job's timing JSON and log one line; None when nothing to say."""
    from mathpt.io import atomic_write_json

    job, out = timing_path(log_path)
    events = read_events(events_path)
    if "start" not in events:
        return None
    record = job_timing(job, events)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, record)
    except OSError as e:
        log.warning("could not write %s: %s", out, e)
    steps = ", ".join(f"{e} {s:.1f} s" for e, s in record["since_start_s"].items() if e != "start")
    log.info("timing of %s since process start: %s", job, steps)
    return record


def read_timings(timing_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every job timing record under ``timing_dir`` (sorted by job); malformed files are skipped."""
    root = Path(timing_dir)
    if not root.is_dir():
        return []
    records = []
    for f in sorted(root.rglob("*.json")):
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("since_start_s"), dict) and "job" in rec:
            records.append(rec)
    return sorted(records, key=lambda r: str(r["job"]))


def reset() -> None:
    """Forget which events this process marked (a new job in the same process, in tests)."""
    _marked.clear()
