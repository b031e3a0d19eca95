"""Run one job per device, each in its own spawned process, and collect the results in job order.

Both evals spread work over devices this way (GSM8K: data shards; lm-eval: task subsets). A fresh
spawned process per job is what makes device pinning reliable: ``CUDA_VISIBLE_DEVICES`` must be set
before CUDA initializes, and vLLM starts its own worker processes that inherit it. CPU jobs share
the cores evenly (``OMP_NUM_THREADS``), so two shards on a 2-core machine do not oversubscribe it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mathpt.io import MathptError


def default_devices() -> list[str]:
    """``cuda:0..N-1`` when GPUs are visible, else ``["cpu"]``; does not initialize CUDA here."""
    from mathpt.gpus import visible_gpu_count

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = len([d for d in visible.split(",") if d.strip()])
    else:
        n = visible_gpu_count()
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def check_devices(devices: list[str]) -> None:
    for d in devices:
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise MathptError(f"unknown device {d!r}: expected 'cpu' or 'cuda:N'")


def _physical_gpu(device: str) -> str:
    """The physical GPU id behind ``cuda:N`` given this process's CUDA_VISIBLE_DEVICES."""
    index = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        if index >= len(ids):
            raise MathptError(f"device {device} is not among CUDA_VISIBLE_DEVICES={visible}")
        return ids[index]
    return str(index)


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


PARENT_POLL_S = 0.5


def guard_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Make this process lead its own process group and take that group down if ``parent_pid`` dies.

    A job killed hard (SIGKILL, OOM killer, scheduler) cannot stop its spawned jobs; without this
    they (and the vLLM engine processes they start, which stay in their group) would outlive it and
    hold the GPU. A daemon thread polls ``getppid`` (re-parenting is how a parent's death shows) and
    kills the whole group within ``poll_s``; the parent's own clean-up kills the group the same way.
    """
    import signal
    import threading

    with contextlib.suppress(OSError):
        os.setsid()

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(poll_s)

    if os.getppid() != parent_pid:  # died before the thread could start
        os.killpg(os.getpgrp(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _kill_group(p) -> None:
    """Kill a job process and everything in its group (it leads one: see guard_parent)."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        if p.pid is not None and p.pid != os.getpgrp():  # its group id is its pid; never our own group
            os.killpg(p.pid, signal.SIGKILL)
    if p.is_alive():
        p.kill()


def _child(
    fn: Callable[..., Any], kwargs: dict, device: str, out_path: str, parent_pid: int | None = None
) -> None:
    if parent_pid is not None:
        guard_parent(parent_pid)
    try:
        result = ("ok", fn(device=device, **kwargs))
    except BaseException as e:  # report every failure to the parent, which raises it
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(out_path, "wb") as f:
        pickle.dump(result, f)


def run_on_devices(fn: Callable[..., Any], jobs: list[tuple[str, dict]], what: str = "job") -> list[Any]:
    """Call ``fn(device=..., **kwargs)`` for each ``(device, kwargs)`` job concurrently, one spawned
    process each; return the results in job order. ``fn`` must be a module-level function.

    Inside a job the device is ``cuda:0`` (its GPU pinned through CUDA_VISIBLE_DEVICES) or ``cpu``.
    If a job fails, the others are stopped and a MathptError carries the failing job's traceback.
    Each job leads its own process group and dies with this process (:func:`guard_parent`).
    """
    check_devices([d for d, _ in jobs])
    n_cpu = sum(d == "cpu" for d, _ in jobs)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_cpu)))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mathpt-jobs-") as tmp:
        procs = []
        for i, (device, kwargs) in enumerate(jobs):
            out = Path(tmp) / f"{i}.pkl"
            if device == "cpu":
                env, child_device = {"OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}, "cpu"
            else:
                env, child_device = {"CUDA_VISIBLE_DEVICES": _physical_gpu(device)}, "cuda:0"
            # spawn copies os.environ when the process starts; daemon=False since vLLM has children
            with _environ(env):
                p = ctx.Process(
                    target=_child, args=(fn, kwargs, child_device, str(out), os.getpid()), daemon=False
                )
                p.start()
            procs.append((p, out, device))
        results: list[Any] = [None] * len(procs)
        try:
            _wait(procs, results, what)
        finally:  # on success the jobs have exited; their engine processes may not have: kill the groups
            for p, _, _ in procs:
                _kill_group(p)
                p.join()
        return results


def _wait(procs: list, results: list, what: str) -> None:
    """Fill ``results`` as processes finish; raise on the first failure (the caller stops the rest)."""
    pending = set(range(len(procs)))
    while pending:
        for i in sorted(pending):
            p, out, device = procs[i]
            if p.is_alive():
                continue
            p.join()
            pending.discard(i)
            if not out.exists():
                raise MathptError(f"{what} {i} on {device} died with exit code {p.exitcode} and no result")
            with open(out, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise MathptError(f"{what} {i} on {device} failed: {value}")
            results[i] = value
        time.sleep(0.2)
