"""Glue for the thin Snakemake scripts: parse the rule's config slice, send the job's output (and its
child processes') to the rule's log file, point every job of a run at one compile cache, record the
job's start-up timing, claim GPUs, and turn user-facing errors into one clear message instead of a
traceback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mathpt.io import MathptError

log = logging.getLogger("mathpt")


def redirect_output(log_path: str) -> TextIO:
    """Point file descriptors 1 and 2 at ``log_path`` and return a stream on the original stderr.

    At the descriptor level, not just ``sys.stdout``: processes the job starts (the inference worker,
    eval shards, vLLM's engine core, lm-eval) inherit fds 1 and 2, so whatever they print lands in the
    job's log too instead of in Snakemake's terminal output.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # Progress bars (tqdm: ours, vLLM's, lm-eval's) redraw many times a second; in a file that is
    # noise, so every tqdm in this job and its children refreshes at most every 30 s.
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    console = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    return console


def setup_logging(log_path: str | None, console: TextIO | None = None) -> None:
    """INFO and up to stderr (the log file once redirected); warnings and errors also to ``console``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if console is not None:
        terminal = logging.StreamHandler(console)
        terminal.setLevel(logging.WARNING)
        terminal.addFilter(lambda record: not getattr(record, "log_file_only", False))
        handlers.append(terminal)
    elif log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )


CACHE_ENV = "MATHPT_CACHE_DIR"
# Each library's own cache variable, and its folder under the run's cache directory.
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def results_dir(log_path: str | None) -> Path:
    """The results tree a job writes to: the parent of the ``logs`` folder holding its log
    (``results/logs/eval/x.log`` -> ``results``), else ``./results``."""
    if log_path:
        parts = Path(log_path).absolute().parent.parts
        if "logs" in parts:
            return Path(*parts[: len(parts) - 1 - parts[::-1].index("logs")])
    return Path("results").absolute()


def use_shared_compile_cache(log_path: str | None) -> dict[str, str]:
    """Point vLLM, torch inductor and Triton at one cache directory per results tree.

    Every job of a run (and every process it spawns: they inherit the environment) then shares one
    compile and graph cache, so only the first engine or compiled trainer of a run pays the compile
    (186 s cold vs ~21 s warm for vLLM on an H100, BENCHMARKS.md). The directory is
    ``$MATHPT_CACHE_DIR`` if set, else ``<results>/.cache``; a library variable the user set
    (``VLLM_CACHE_ROOT``, ``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) is kept. Returns the
    variables it set.
    """
    root = Path(os.environ.get(CACHE_ENV) or results_dir(log_path) / ".cache").absolute()
    chosen = {}
    for var, sub in CACHE_VARS.items():
        if not os.environ.get(var):
            os.environ[var] = chosen[var] = str(root / sub)
    return chosen


def run_script(smk: Any, main: Callable[[Any, dict], None], gpus: int = 0) -> None:
    """Run ``main(snakemake, cfg)`` for a rule; ``cfg`` is the rule's config slice from ``params.cfg``.

    GPU counts come from the rule's ``resources.gpu`` (computed once, in the rules), never recomputed
    here; ``gpus`` is only for callers without that resource.
    """
    from mathpt import timing
    from mathpt.gpus import claim_gpus, peak_gpu_memory

    log_path = str(smk.log[0]) if len(smk.log) else None
    console = redirect_output(log_path) if log_path else None
    setup_logging(log_path, console)
    for var, path in use_shared_compile_cache(log_path).items():
        log.info("compile cache: %s=%s", var, path)
    events = _start_timing(log_path)
    cfg = json.loads(smk.params.cfg) if hasattr(smk.params, "cfg") else {}
    n_gpus = int(getattr(smk.resources, "gpu", gpus) or 0)
    try:
        with claim_gpus(n_gpus):
            main(smk, cfg)
            timing.mark("end")
            if peak := peak_gpu_memory():
                log.info("rule %s: %s", smk.rule, peak)
            if events:
                timing.write_job_timing(log_path, events)
    except MathptError as e:
        log.error("%s", e, extra={"log_file_only": True})  # the console gets the line below
        print(f"\nmathpt error in rule {smk.rule}: {e}", file=console or sys.stderr)
        sys.exit(1)
    except Exception:
        log.error("unexpected failure in rule %s:\n%s", smk.rule, traceback.format_exc())
        raise
    finally:
        if events:
            with contextlib.suppress(OSError):
                os.unlink(events)


def _start_timing(log_path: str | None) -> str | None:
    """Create the job's timing events file (``mathpt.timing``) and mark the process start in it."""
    from mathpt import timing

    if not log_path:
        return None
    fd, events = tempfile.mkstemp(prefix="mathpt-timing-", suffix=".jsonl")
    os.close(fd)
    os.environ[timing.ENV] = events  # spawned processes inherit it
    timing.reset()
    with open(events, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "start", "t": timing.process_start_time(), "pid": os.getpid()}) + "\n")
    return events
