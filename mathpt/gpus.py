"""Pin each GPU job to its own GPUs, within the GPUs the scheduler gave it.

Snakemake's ``resources: gpu=N`` only limits how many GPUs run jobs at once; it does not say which.
Each job claims free GPU ids with non-blocking ``flock`` on per-GPU lock files and sets
``CUDA_VISIBLE_DEVICES``, so concurrent jobs never share a GPU by accident. When
``CUDA_VISIBLE_DEVICES`` is already set (by SLURM's ``--gpus``, a container or the user), only the
GPUs it lists are candidates: a job never takes a GPU it was not given.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mathpt.io import MathptError


def physical_gpu_count() -> int:
    """GPUs this process can see through the driver (nvidia-smi -L), without initializing CUDA here.

    ``MATHPT_NUM_GPUS`` overrides the count (machines without nvidia-smi, tests). Under SLURM with
    device cgroups, nvidia-smi lists only the job's GPUs, numbered from 0 like CUDA_VISIBLE_DEVICES.
    """
    env = os.environ.get("MATHPT_NUM_GPUS")
    if env is not None:
        return int(env)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def visible_gpus() -> list[str]:
    """The GPU ids a job may use: CUDA_VISIBLE_DEVICES's entries when it is set, else 0..N-1.

    CUDA's own reading of the variable: entries are indices or ``GPU-``/``MIG-`` UUIDs, and the list
    ends at the first entry that names no GPU (so ``""`` and ``"-1"`` mean none).
    """
    total = physical_gpu_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(total)]
    ids: list[str] = []
    for entry in (e.strip() for e in env.split(",")):
        ok = (entry.isdigit() and int(entry) < total) or (total > 0 and re.match(r"^(GPU|MIG)-", entry))
        if not ok or entry in ids:
            break
        ids.append(entry)
    return ids


def visible_gpu_count() -> int:
    """Number of GPUs a job may use (see ``visible_gpus``)."""
    return len(visible_gpus())


def _no_gpus_message(n: int, ids: list[str]) -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"nvidia-smi -L lists {physical_gpu_count()}"
    if env is not None:
        seen += f", CUDA_VISIBLE_DEVICES={env!r} (set by the scheduler, a container or you) leaves {len(ids)}"
    hint = (
        "with runtime.layout cpu no rule asks for a GPU; on SLURM a rule's gpu=N becomes --gpus=N, so "
        "run GPU rules on a GPU partition (MATHPT_SLURM_GPU_PARTITION, profiles/slurm)"
    )
    return (
        f"this job needs {n} GPU(s) (config runtime.layout) but only {len(ids)} are visible: {seen}; {hint}"
    )


def _lock_dir(lock_dir: str | os.PathLike | None) -> Path:
    """Lock files live here; a SLURM job's GPUs are its own, and their ids may be renumbered from 0 in
    every job, so each SLURM job locks in its own subdirectory."""
    base = Path(lock_dir or os.environ.get("MATHPT_GPU_LOCK_DIR", tempfile.gettempdir()))
    job = os.environ.get("SLURM_JOB_ID")
    return base / f"slurm-{job}" if job else base


@contextlib.contextmanager
def claim_gpus(
    n: int, lock_dir: str | os.PathLike | None = None, timeout_s: float = 600
) -> Iterator[list[str]]:
    """Claim ``n`` of the visible GPUs (flock), export CUDA_VISIBLE_DEVICES; release and restore on exit.

    ``n == 0`` is a no-op. Fails at once when fewer than ``n`` GPUs are visible; waits up to
    ``timeout_s`` only for GPUs that exist but other jobs hold. Yields the claimed ids as strings.
    """
    if n == 0:
        yield []
        return
    ids = visible_gpus()
    if len(ids) < n:
        raise MathptError(_no_gpus_message(n, ids))
    lock_dir = _lock_dir(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    held: list[tuple[str, int]] = []
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        while len(held) < n:
            for gpu in ids:
                if len(held) == n or any(gpu == g for g, _ in held):
                    continue
                fd = os.open(lock_dir / f"mathpt-gpu-{gpu}.lock", os.O_CREAT | os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append((gpu, fd))
                except BlockingIOError:
                    os.close(fd)
            if len(held) < n:
                if time.monotonic() > deadline:
                    raise MathptError(
                        f"could not claim {n} free GPU(s) of {','.join(ids)} within {timeout_s:.0f} s; "
                        "run snakemake with --resources gpu=<number of GPUs>"
                    )
                time.sleep(1.0)
        gpus = [g for g, _ in held]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        yield gpus
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
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


def peak_gpu_memory() -> str | None:
    """This process's peak GPU memory per device (torch's allocator), or None if it used no GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    gib = 1024**3
    return "; ".join(
        f"peak GPU memory on cuda:{i}: {torch.cuda.max_memory_allocated(i) / gib:.2f} GiB allocated, "
        f"{torch.cuda.max_memory_reserved(i) / gib:.2f} GiB reserved by torch"
        for i in range(torch.cuda.device_count())
    )
