"""Pin each GPU job to its own GPUs.

Snakemake's ``resources: gpu=N`` only limits how many GPUs run jobs at once; it does not say which.
Each job claims free GPU indices with non-blocking ``flock`` on per-GPU lock files and sets
``CUDA_VISIBLE_DEVICES``, so concurrent jobs never share a GPU by accident.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mathpt.io import MathptError


def visible_gpu_count() -> int:
    """Number of GPUs on this machine, without initializing CUDA in this process."""
    env = os.environ.get("MATHPT_NUM_GPUS")
    if env is not None:
        return int(env)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@contextlib.contextmanager
def claim_gpus(n: int, lock_dir: str | os.PathLike | None = None, timeout_s: float = 600) -> Iterator[list[int]]:
    """Claim ``n`` GPUs (flock), export CUDA_VISIBLE_DEVICES, release on exit. ``n == 0`` is a no-op."""
    if n == 0:
        yield []
        return
    total = visible_gpu_count()
    if total < n:
        raise MathptError(f"this job needs {n} GPU(s) but {total} are visible (nvidia-smi -L)")
    lock_dir = Path(lock_dir or os.environ.get("MATHPT_GPU_LOCK_DIR", tempfile.gettempdir()))
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    held: list[tuple[int, int]] = []
    try:
        while len(held) < n:
            for i in range(total):
                if len(held) == n or any(i == g for g, _ in held):
                    continue
                fd = os.open(lock_dir / f"mathpt-gpu-{i}.lock", os.O_CREAT | os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append((i, fd))
                except BlockingIOError:
                    os.close(fd)
            if len(held) < n:
                if time.monotonic() > deadline:
                    raise MathptError(f"could not claim {n} free GPU(s) within {timeout_s:.0f} s; "
                                      "run snakemake with --resources gpu=<number of GPUs>")
                time.sleep(1.0)
        gpus = [g for g, _ in held]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        yield gpus
    finally:
        for _, fd in held:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def gpus_for(layout: str, role: str) -> int:
    """GPUs a job of ``role`` ('train' or 'infer') needs under a device layout."""
    if layout == "cpu":
        return 0
    if layout == "one_gpu":
        return 1
    return 2 if role == "train" else 1


def devices_for(layout: str) -> tuple[str, str]:
    """(trainer device, inference worker device) for a layout, after CUDA_VISIBLE_DEVICES is set."""
    return {"cpu": ("cpu", "cpu"), "one_gpu": ("cuda:0", "cuda:0"), "two_gpu": ("cuda:0", "cuda:1")}[layout]
