"""The trainer's side of the dual-process runtime: ``InferenceClient`` and ``RolloutPipeline``.

The trainer sends jobs (rollouts to generate, checkpoints to evaluate) to one inference worker
process and drains results without blocking its optimizer loop; it pushes new weights in memory
(see ``handoff.py``). Every call that talks to the worker first checks that it is alive and
beating, so a dead or hung worker turns into a ``WorkerError`` naming the cause within
``heartbeat_timeout_s``, and the worker's whole process group is killed on any failure, on close,
at interpreter exit and on SIGTERM/SIGHUP (Ctrl-C reaches ``__exit__`` as KeyboardInterrupt).

Usage (no ``if __name__ == "__main__"`` guard needed: the worker never re-imports the main script)::

    with InferenceClient("vllm", model_dir, device="cuda:1") as client:
        for step in range(n_steps):
            for r in client.poll(kind="eval"):
                log(r)                     # tagged with r.step and r.weight_version
            ...optimizer step...
            client.push_weights(model, version=step + 1)
            if step % 50 == 0:
                client.submit("eval", val_prompts, greedy, step=step)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from mathpt.engines.base import SamplingConfig
from mathpt.io import MathptError
from mathpt.runtime.handoff import Layout, Mailbox, WorkerError, make_sender, named_weights, resolve_mode
from mathpt.runtime.worker import KINDS, Job, JobResult, WorkerConfig, worker_main

__all__ = ["InferenceClient", "JobResult", "RolloutPipeline", "WorkerError", "JobTimeout"]

BOOT_GRACE_S = 120.0  # before the worker's first heartbeat (spawn + imports on a loaded machine)
STARTUP_HEARTBEAT_S = 300.0  # the heartbeat limit until the engine is up


class JobTimeout(MathptError):
    """``wait`` ran out of time; the worker is alive."""


_LIVE: weakref.WeakSet[InferenceClient] = weakref.WeakSet()
_PREV_HANDLERS: dict[int, object] = {}


def _kill_all() -> None:
    for c in list(_LIVE):
        c._kill()


def _close_all() -> None:
    for c in list(_LIVE):
        try:
            c.close()  # a short grace period, then the process group is killed
        except Exception:  # noqa: BLE001 - at exit, make sure the rest still go
            c._kill()


def _on_signal(signum, frame) -> None:
    _kill_all()
    raise SystemExit(128 + signum)


atexit.register(_close_all)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig not in _PREV_HANDLERS and signal.getsignal(sig) is signal.SIG_DFL:
            _PREV_HANDLERS[sig] = signal.signal(sig, _on_signal)


def _restore_signal_handlers() -> None:
    if _LIVE or threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_PREV_HANDLERS.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)
        del _PREV_HANDLERS[sig]


@contextlib.contextmanager
def _spawn_without_main():
    """Start the child without re-importing the parent's ``__main__``.

    ``spawn`` normally re-runs the main script in the child, which breaks scripts without an
    ``if __name__ == "__main__"`` guard (Snakemake ``script:`` files, notebooks). The worker's
    entry point lives in this package, so the child never needs ``__main__``.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


class InferenceClient:
    """One inference worker process beside the trainer, with job/result queues and weight hand-off.

    ``engine``: "vllm" | "hf"; ``device``: the worker's device, "cpu" or "cuda:N" (trainer's
    numbering; the trainer's device is wherever the pushed model lives); ``handoff``:
    "auto" | "shm" | "cuda_ipc" | "nccl" | "disk"; ``engine_kwargs`` go to the engine (for vLLM on
    a shared GPU, ``gpu_memory_utilization`` is the worker's share of the GPU); ``sleep_when_idle``:
    the worker puts its engine to sleep whenever it runs out of jobs (``runtime.sleep_between_rollouts``),
    and this side empties torch's cache before each push so the waking worker gets its memory back.
    ``worker_threads``: the worker's share of the cores on a shared CPU (``worker.share_cpu_threads``).
    ``worker_memory`` holds what the worker last reported of its GPU memory (GiB).
    """

    def __init__(
        self,
        engine: str = "vllm",
        model_path: str | os.PathLike = "",
        device: str = "cpu",
        handoff: str = "auto",
        engine_kwargs: dict | None = None,
        heartbeat_timeout_s: float = 30.0,
        startup_timeout_s: float = 900.0,
        job_timeout_s: float = 3600.0,
        handoff_timeout_s: float = 600.0,
        sleep_when_idle: bool = False,
        worker_threads: int | None = None,
    ) -> None:
        if engine not in ("vllm", "hf"):
            raise MathptError(f"engine {engine!r}: expected 'vllm' or 'hf'")
        if not (device == "cpu" or device.startswith("cuda")):
            raise MathptError(f"device {device!r}: expected 'cpu' or 'cuda:N'")
        self.engine, self.model_path, self.device = engine, str(model_path), device
        self.handoff = handoff
        self.engine_kwargs = dict(engine_kwargs or {})
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.startup_timeout_s = startup_timeout_s
        # Every wait is bounded: a worker that beats but is stuck (a wedged engine, a collective that
        # never completes) ends the job with a message naming what was waited for.
        self.job_timeout_s, self.handoff_timeout_s = job_timeout_s, handoff_timeout_s
        self.sleep_when_idle = sleep_when_idle
        self.worker_threads = worker_threads  # the worker's share of the cores (cpu layout), or None
        self.worker_memory: dict[str, float] = {}
        self._proc = None
        self._result_q = None
        self._mailbox = None
        self._final_version = 0
        self._ready: dict | None = None
        self._error: WorkerError | None = None
        self._sender = None
        self._pushed = 0
        self._ids = itertools.count()
        self._outstanding: dict[int, str] = {}
        self._results: dict[int, JobResult] = {}
        self._delivered: set[int] = set()

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> InferenceClient:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # Ctrl-C or an error in the training loop: no grace period
            self._kill()
            _restore_signal_handlers()
        else:
            self.close()

    def start(self) -> InferenceClient:
        """Spawn the worker (returns at once; calls that need the engine wait for it)."""
        if self._proc is not None:
            return self
        ctx = torch.multiprocessing.get_context("spawn")
        self._job_q, self._result_q = ctx.Queue(), ctx.Queue()
        self._ctrl_q, self._ack_q = ctx.Queue(), ctx.Queue()
        self._mailbox = Mailbox(ctx)
        self._heartbeat = ctx.Value("d", time.time() + BOOT_GRACE_S, lock=False)
        cfg = WorkerConfig(
            self.engine,
            self.model_path,
            self.device,
            self.engine_kwargs,
            os.getpid(),
            sleep_when_idle=self.sleep_when_idle,
            threads=self.worker_threads,
        )
        self._proc = ctx.Process(
            target=worker_main,
            args=(
                cfg,
                self._job_q,
                self._result_q,
                self._ctrl_q,
                self._ack_q,
                self._mailbox,
                self._heartbeat,
            ),
            name="mathpt-inference-worker",
            daemon=True,
        )
        with _spawn_without_main():
            self._proc.start()
        _LIVE.add(self)
        _install_signal_handlers()
        return self

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the engine is up; returns the worker's info (pid, engine dtype)."""
        timeout = self.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while self._ready is None:
            self._drain(0.2)
            self._check()
            if self._ready is None and time.monotonic() > deadline:
                self._fail(
                    f"the inference worker ({self.engine} on {self.device}) did not start within {timeout:.0f} s"
                )
        return self._ready

    def close(self) -> None:
        """Stop the worker (graceful for a moment, then its process group is killed)."""
        if self._proc is None:
            return
        if self._proc.is_alive() and self._error is None:
            with contextlib.suppress(Exception):
                self._job_q.put(("stop",))
                self._ctrl_q.put(("stop",))
            self._proc.join(timeout=5.0)
        self._kill()
        _restore_signal_handlers()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its own group
        with contextlib.suppress(Exception):
            proc.kill()
        proc.join(timeout=10.0)
        for q in (self._job_q, self._result_q, self._ctrl_q, self._ack_q):
            q.cancel_join_thread()
            q.close()
        # drop the queues now so their semaphores are released here, not reported at interpreter exit
        self._job_q = self._result_q = self._ctrl_q = self._ack_q = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._final_version = self._mailbox.applied.value
        self._mailbox = None  # frees its semaphore now, not at interpreter exit
        _LIVE.discard(self)

    # ------------------------------------------------------------ health

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _fail(self, msg: str) -> None:
        busy = sorted(self._outstanding)
        if busy:
            msg += f"; unfinished jobs: {busy[:10]}{' ...' if len(busy) > 10 else ''}"
        self._error = WorkerError(msg)
        self._kill()
        raise self._error

    def _check(self) -> None:
        """Raise ``WorkerError`` if the worker exited, reported a fatal error or stopped beating."""
        if self._error is not None:
            raise self._error
        if self._proc is None:
            raise MathptError("InferenceClient is closed (use it as a context manager or call start())")
        code = self._proc.exitcode
        if code is not None:
            self._drain(0.0, check_fatal=False)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            self._fail(f"the inference worker (pid {self._proc.pid}) {how}" + self._fatal_suffix())
        silent = time.time() - self._heartbeat.value
        # engine start-up (compilation, graph capture) may hold the GIL for long stretches
        limit = (
            self.heartbeat_timeout_s
            if self._ready is not None
            else max(self.heartbeat_timeout_s, STARTUP_HEARTBEAT_S)
        )
        if silent > limit:
            self._fail(
                f"the inference worker (pid {self._proc.pid}) sent no heartbeat for {silent:.1f} s "
                f"(heartbeat_timeout_s={limit}): it is hung; killed it"
            )

    def _fatal_suffix(self) -> str:
        return f": {self._fatal}" if getattr(self, "_fatal", None) else ""

    def _drain(self, block_s: float, check_fatal: bool = True) -> None:
        while self._result_q is not None:
            try:
                msg = self._result_q.get(timeout=block_s) if block_s > 0 else self._result_q.get_nowait()
            except (queue.Empty, OSError, EOFError, ValueError):
                return
            block_s = 0.0
            if msg[0] == "result":
                self._outstanding.pop(msg[1].job_id, None)
                self._results[msg[1].job_id] = msg[1]
                self.worker_memory.update(msg[1].gpu_memory or {})
            elif msg[0] == "ready":
                self._ready = msg[1]
            elif msg[0] == "fatal":
                self._fatal = "\n" + msg[1]
                if check_fatal:
                    self._fail(f"the inference worker failed{self._fatal_suffix()}")

    # ------------------------------------------------------------ weights

    @property
    def pushed_version(self) -> int:
        """The newest version handed to the worker (0: the weights it loaded from ``model_path``)."""
        return self._pushed

    @property
    def weight_version(self) -> int:
        """The version the worker's engine runs now (the last one it ran, once closed)."""
        return self._mailbox.applied.value if self._mailbox is not None else self._final_version

    def _send_ctrl(self, msg: tuple) -> None:
        self._ctrl_q.put(msg)

    def _wait_ack(self, key, timeout_s: float | None = None) -> bool:
        """Wait for the worker to acknowledge hand-off step ``key``; raise with its error if it failed.

        With ``timeout_s`` return False when it passes first (0: look once); without, wait at most
        ``handoff_timeout_s`` and then fail naming the step.
        """
        limit = self.handoff_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            self._check()
            try:
                got, err = self._ack_q.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())) or 0.001)
            except queue.Empty:
                got, err = None, None
            if got == key:
                if err is not None:
                    self._fail(f"weight hand-off {key} failed in the inference worker:\n{err}")
                return True
            if time.monotonic() >= deadline:
                if timeout_s is not None:
                    return False
                self._fail(
                    f"the inference worker did not acknowledge weight hand-off {key} within {limit:.0f} s "
                    "(runtime.handoff_timeout_s)"
                )

    def push_weights(self, model, version: int) -> float:
        """Stage ``model``'s weights as ``version`` in the worker; returns the seconds it blocked.

        Returns once the new weights sit where the worker applies them from, between two
        generations; jobs submitted afterwards run on exactly ``version``. ``model`` is an
        ``nn.Module`` (HF parameter names) or an iterable/dict of ``(name, tensor)``.
        """
        t0 = time.perf_counter()
        if version <= self._pushed:
            raise MathptError(
                f"push_weights: version {version} must exceed the last pushed version {self._pushed}"
            )
        self.wait_ready()
        if self.sleep_when_idle and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the sleeping worker wakes for these weights: give back the cache
        named = named_weights(model)
        if not named:
            raise MathptError("push_weights: the model has no parameters")
        if self._sender is None:
            self._setup(named)
        else:
            self._sender.layout.check(named)
        self._sender.push(named, version)
        self._pushed = version
        if self._sender.mode != "nccl":  # nccl: the worker's hand-off thread wakes the main loop
            self._job_q.put(("weights", version))
        return time.perf_counter() - t0

    def _setup(self, named) -> None:
        device = named[0][1].device
        mode = resolve_mode(self.handoff, device, self.device)
        dtype = self._ready.get("dtype") or named[0][1].dtype
        sender = make_sender(
            mode,
            Layout.of(named, dtype),
            device,
            self._mailbox,
            self._check,
            self._send_ctrl,
            self._wait_ack,
            timeout_s=self.handoff_timeout_s,
        )
        self._send_ctrl(("setup", sender.setup_message()))
        sender.connect()
        self._wait_ack(("setup", mode))
        self._sender = sender

    def set_handoff(self, mode: str) -> None:
        """Switch the hand-off mode (e.g. to time the ``disk`` fallback); takes effect at the next push."""
        if self._sender is not None:
            self.wait_applied(self._pushed)
            self._sender.close()
            self._sender = None
        self.handoff = mode

    @property
    def handoff_mode(self) -> str | None:
        """The resolved mode in use (None before the first push)."""
        return self._sender.mode if self._sender is not None else None

    def wait_applied(self, version: int, timeout: float | None = None) -> float:
        """Block until the worker's engine runs ``version`` or newer (at most ``timeout``, default
        ``handoff_timeout_s``); returns the seconds waited."""
        timeout = self.handoff_timeout_s if timeout is None else timeout
        t0 = time.perf_counter()
        while self._mailbox.applied.value < version:
            self._check()
            if time.perf_counter() - t0 > timeout:
                raise JobTimeout(
                    f"the worker did not apply weight version {version} within {timeout:.0f} s "
                    f"(it runs version {self._mailbox.applied.value})"
                )
            time.sleep(0.0002)
        return time.perf_counter() - t0

    # ------------------------------------------------------------ jobs

    def submit(
        self, kind: str, prompts: Sequence, params: SamplingConfig, step: int, tag: dict | None = None
    ) -> int:
        """Queue a job (non-blocking); it runs on exactly the newest pushed weights (the worker holds
        newer ones back until it is done, so which weights generated it never depends on timing)."""
        if kind not in KINDS:
            raise MathptError(f"submit: kind {kind!r}: expected one of {KINDS}")
        if not prompts:
            raise MathptError(f"submit: {kind} job at step {step} has no prompts")
        self._check()
        job_id = next(self._ids)
        self._job_q.put(("job", Job(job_id, kind, list(prompts), params, int(step), tag, self._pushed)))
        self._outstanding[job_id] = kind
        return job_id

    def poll(self, kind: str | None = None) -> list[JobResult]:
        """Finished results not yet returned (of ``kind`` if given), oldest first; never blocks.

        A result is returned once: poll the kinds you do not ``wait`` for (e.g. ``kind="eval"``).
        """
        self._drain(0.0)
        self._check()
        ids = sorted(i for i, r in self._results.items() if kind is None or r.kind == kind)
        self._delivered.update(ids)
        return [self._results.pop(i) for i in ids]

    def wait(self, job_id: int, timeout: float | None = None) -> JobResult:
        """Block until ``job_id`` finishes, at most ``timeout`` s (default ``job_timeout_s``); raises
        ``WorkerError`` if the worker dies meanwhile, ``JobTimeout`` naming the job when time runs out."""
        if job_id in self._delivered:
            raise MathptError(f"wait: job {job_id} was already returned by poll()")
        if job_id not in self._results and job_id not in self._outstanding:
            raise MathptError(f"wait: unknown job id {job_id}")
        timeout = self.job_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while job_id not in self._results:
            self._drain(0.1)
            self._check()
            if time.monotonic() > deadline and job_id not in self._results:
                kind = self._outstanding.get(job_id, "")
                raise JobTimeout(
                    f"wait: {kind} job {job_id} did not finish within {timeout:g} s "
                    f"(runtime.job_timeout_s); the worker ({self.engine} on {self.device}) is alive "
                    f"but its engine made no result; {len(self._outstanding)} job(s) unfinished"
                )
        self._delivered.add(job_id)
        return self._results.pop(job_id)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        return len(self._outstanding)


class RolloutPipeline:
    """Rollout jobs kept up to ``max_staleness`` steps ahead of the trainer: the one owner of rollout
    submit / wait / staleness (``train_pg`` uses it; evals go through ``EvalTracker``, which polls
    only eval results, so the two never take each other's).

    ``make_job(step) -> (prompts, tag)`` gives step ``step``'s prompts; ``params`` is a
    ``SamplingConfig`` or a function of the step (e.g. per-step sampling seeds). With
    ``max_staleness=0`` each step's rollouts are generated after the weights of the previous step
    were pushed (synchronous, the trainer waits). With ``1`` the worker generates batch k+1 with
    weights k while the trainer learns on batch k; the batch is then at most one version old. Call
    ``get(step)`` once per step and ``client.push_weights`` after each optimizer update. No job is
    queued for a step at or past ``n_steps`` (None: no end).
    """

    def __init__(
        self,
        client: InferenceClient,
        params: SamplingConfig | Callable[[int], SamplingConfig],
        make_job: Callable[[int], tuple[Sequence, dict | None]],
        max_staleness: int = 0,
        n_steps: int | None = None,
    ) -> None:
        if max_staleness < 0:
            raise MathptError(f"max_staleness must be >= 0, got {max_staleness}")
        self.client, self.params, self.make_job, self.max_staleness = client, params, make_job, max_staleness
        self.n_steps = n_steps
        self._jobs: dict[int, int] = {}
        self.wait_s = 0.0  # total trainer time blocked in get()
        self.last_wait_s = 0.0  # that of the last get()

    def _submit(self, step: int) -> None:
        if step not in self._jobs and (self.n_steps is None or step < self.n_steps):
            prompts, tag = self.make_job(step)
            params = self.params if isinstance(self.params, SamplingConfig) else self.params(step)
            self._jobs[step] = self.client.submit("rollout", prompts, params, step=step, tag=tag)

    def submit(self, step: int) -> None:
        """Queue step ``step``'s job now, on the weights pushed so far (a resume re-creates the queue)."""
        self._submit(step)

    def get(self, step: int, timeout: float | None = None) -> JobResult:
        """Step ``step``'s rollouts; also queues the next ``max_staleness`` steps' jobs."""
        self._submit(step)
        for ahead in range(step + 1, step + 1 + self.max_staleness):
            self._submit(ahead)
        t0 = time.perf_counter()
        res = self.client.wait(self._jobs.pop(step), timeout=timeout).raise_for_error()
        self.last_wait_s = time.perf_counter() - t0
        self.wait_s += self.last_wait_s
        lag = self.client.pushed_version - res.weight_version
        if lag > self.max_staleness:
            raise MathptError(
                f"rollouts for step {step} came from weight version {res.weight_version}, {lag} versions behind "
                f"the trainer's {self.client.pushed_version} (max_staleness={self.max_staleness}): "
                "push weights once per step"
            )
        return res

    def extra(
        self, step: int, prompts: Sequence, params: SamplingConfig, tag: dict | None = None
    ) -> JobResult:
        """One more rollout job for step ``step``, waited for now: it runs on the newest pushed weights
        (after any job already queued ahead). DAPO's dynamic sampling draws these to refill a batch."""
        t0 = time.perf_counter()
        job = self.client.submit("rollout", prompts, params, step=step, tag=tag)
        res = self.client.wait(job).raise_for_error()
        waited = time.perf_counter() - t0
        self.last_wait_s += waited
        self.wait_s += waited
        return res
