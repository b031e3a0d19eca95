"""Glue for the thin Snakemake scripts: parse the rule's config slice, send the job's output (and its
child processes') to the rule's log file, claim GPUs, and turn user-facing errors into one clear
message instead of a traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
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


def run_script(smk: Any, main: Callable[[Any, dict], None], gpus: int = 0) -> None:
    """Run ``main(snakemake, cfg)`` for a rule; ``cfg`` is the rule's config slice from ``params.cfg``.

    GPU counts come from the rule's ``resources.gpu`` (computed once, in the rules), never recomputed
    here; ``gpus`` is only for callers without that resource.
    """
    from mathpt.gpus import claim_gpus, peak_gpu_memory

    log_path = str(smk.log[0]) if len(smk.log) else None
    console = redirect_output(log_path) if log_path else None
    setup_logging(log_path, console)
    cfg = json.loads(smk.params.cfg) if hasattr(smk.params, "cfg") else {}
    n_gpus = int(getattr(smk.resources, "gpu", gpus) or 0)
    try:
        with claim_gpus(n_gpus):
            main(smk, cfg)
            if peak := peak_gpu_memory():
                log.info("rule %s: %s", smk.rule, peak)
    except MathptError as e:
        log.error("%s", e, extra={"log_file_only": True})  # the console gets the line below
        print(f"\nmathpt error in rule {smk.rule}: {e}", file=console or sys.stderr)
        sys.exit(1)
    except Exception:
        log.error("unexpected failure in rule %s:\n%s", smk.rule, traceback.format_exc())
        raise
