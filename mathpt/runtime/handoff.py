"""Weight hand-off from the trainer process into the inference worker, versioned and never half-applied.

All modes share one protocol. A *mailbox* (a cross-process lock plus two shared integers,
``staged`` and ``applied``) says which version sits in the staging area. Whoever writes the staging
area holds the lock while writing and then sets ``staged``; the worker, between two generations
only, takes the lock, loads the staged tensors into its engine and sets ``applied``. So a
generation never sees two versions, the trainer never blocks for a whole generation (at most for
one ``load_weights``), and when several versions are pushed while the worker is busy the newest wins.

Modes (the staging area and who writes it):
- ``shm``: one flat tensor in CPU shared memory, written by the trainer (CPU layouts).
- ``cuda_ipc``: one flat tensor on the shared GPU, shared once through CUDA IPC, written by the
  trainer (trainer and worker on one GPU).
- ``nccl``: a flat tensor on the worker's GPU, filled by a ``broadcast`` from the trainer over a
  two-rank process group (NCCL across GPUs; gloo when both are on CPU, which makes it testable).
  A thread in the worker receives it while the main thread keeps generating.
- ``disk``: a safetensors file per version under /dev/shm (the fallback; costs seconds at 1.5B).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mathpt.io import MathptError


class WorkerError(MathptError):
    """The inference worker died, hung, failed to start or failed a weight hand-off."""


MODES = ("shm", "cuda_ipc", "nccl", "disk")
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP wrappers


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the flat buffer
    numel: int


@dataclass(frozen=True)
class Layout:
    """Where each named tensor lives inside one flat buffer of ``dtype``."""

    specs: tuple[TensorSpec, ...]
    dtype: torch.dtype
    numel: int

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Layout:
        specs, off = [], 0
        for name, t in named:
            specs.append(TensorSpec(name, tuple(t.shape), off, t.numel()))
            off += t.numel()
        return cls(tuple(specs), dtype, off)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(s.name, flat[s.offset : s.offset + s.numel].view(s.shape)) for s in self.specs]

    def check(self, named: list[tuple[str, torch.Tensor]]) -> None:
        got = [(n, tuple(t.shape)) for n, t in named]
        want = [(s.name, s.shape) for s in self.specs]
        if got != want:
            diff = sorted(set(got) ^ set(want))[:5]
            raise MathptError(
                f"push_weights: the model's parameters changed since the first push (e.g. {diff})"
            )

    def pack(self, named: list[tuple[str, torch.Tensor]], flat: torch.Tensor) -> None:
        """Copy (and cast) every tensor into its slot of ``flat``: one fused launch where possible."""
        dst = [v for _, v in self.views(flat)]
        src = [t.detach() for _, t in named]
        if all(s.device == flat.device for s in src):
            torch._foreach_copy_(dst, src)  # private but stable since torch 2.1; a loop is ~300 launches
        else:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=True)


def named_weights(model) -> list[tuple[str, torch.Tensor]]:
    """HF parameter names of a module (tied weights once), or the pairs/dict given."""
    if isinstance(model, torch.nn.Module):
        items = list(model.named_parameters())
    elif isinstance(model, dict):
        items = list(model.items())
    else:
        items = list(model)
    out = []
    for name, t in items:
        for p in _PREFIXES:
            name = name.removeprefix(p)
        out.append((name, t))
    return out


def resolve_mode(mode: str, trainer_device: torch.device, worker_device: str) -> str:
    """``auto``: CPU worker -> shm; same GPU -> cuda_ipc; different GPUs -> nccl."""
    if mode != "auto":
        if mode not in MODES:
            raise MathptError(f"handoff {mode!r}: expected one of auto, {', '.join(MODES)}")
        return mode
    wdev = torch.device(worker_device)
    if wdev.type == "cpu" or trainer_device.type == "cpu":
        return "shm"
    same = (trainer_device.index or 0) == (wdev.index or 0)
    return "cuda_ipc" if same else "nccl"


class Mailbox:
    """The cross-process lock and version counters (made in the trainer, inherited by the worker)."""

    def __init__(self, ctx) -> None:
        self.lock = ctx.Lock()
        self.staged = ctx.Value("q", 0, lock=False)
        self.applied = ctx.Value("q", 0, lock=False)

    def acquire(self, check: Callable[[], None], timeout_s: float = 600.0) -> None:
        """Take the lock, calling ``check`` (which raises if the worker died) while waiting; a worker
        that holds it longer than ``timeout_s`` (stuck applying weights) ends the wait with an error."""
        deadline = time.monotonic() + timeout_s
        while not self.lock.acquire(timeout=min(0.5, timeout_s)):
            check()
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"the inference worker held the weight hand-off lock for more than {timeout_s:.0f} s "
                    "(runtime.handoff_timeout_s): it is stuck applying weights"
                )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_process_group(backend: str, host: str, port: int, rank: int, timeout_s: float):
    """A standalone two-rank group (trainer 0, worker 1) that leaves torch.distributed's default group
    alone: vLLM creates its own default group in the worker."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, 2, rank == 0, timeout=timeout, wait_for_workers=False)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, 2, opts)


# ---------------------------------------------------------------- trainer side


class Sender:
    """Trainer side of one hand-off mode.

    ``check()`` raises if the worker died; ``send(msg)`` puts a message on the worker's hand-off
    queue; ``wait_ack(key, timeout_s=None)`` blocks (checking the worker) until the worker
    acknowledges ``key``, raising with the worker's error if it failed; with ``timeout_s`` it returns
    False when that passes first. Every wait here ends within ``timeout_s``.
    """

    mode: str

    def __init__(
        self,
        layout: Layout,
        device: torch.device,
        mailbox: Mailbox,
        check: Callable[[], None],
        send: Callable[[tuple], None],
        wait_ack: Callable[..., bool],
        timeout_s: float = 600.0,
    ):
        self.layout, self.device, self.mailbox = layout, device, mailbox
        self.check, self.send, self.wait_ack = check, send, wait_ack
        self.timeout_s = timeout_s

    def setup_message(self) -> dict:
        """What the worker needs to build its ``Receiver``."""
        raise NotImplementedError

    def connect(self) -> None:
        """Called after the setup message is sent (rendezvous for ``nccl``)."""

    def push(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Stage ``version``; returns once the worker can apply it without the trainer."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SharedBufferSender(Sender):
    """``shm`` and ``cuda_ipc``: the trainer writes the flat buffer the worker reads, under the lock."""

    def __init__(self, mode: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = mode
        buf_device = self.device if mode == "cuda_ipc" else torch.device("cpu")
        self.flat = torch.empty(self.layout.numel, dtype=self.layout.dtype, device=buf_device)
        if mode == "shm":
            self.flat.share_memory_()

    def setup_message(self) -> dict:
        if self.mode == "cuda_ipc":
            from torch.multiprocessing.reductions import reduce_tensor

            # the worker may number GPUs differently (CUDA_VISIBLE_DEVICES): it patches the index
            return {"mode": self.mode, "layout": self.layout, "ipc": reduce_tensor(self.flat)}
        return {"mode": self.mode, "layout": self.layout, "flat": self.flat}

    def push(self, named, version) -> None:
        self.mailbox.acquire(self.check, self.timeout_s)
        try:
            self.layout.pack(named, self.flat)
            _sync(self.flat.device)
            self.mailbox.staged.value = version
        finally:
            self.mailbox.lock.release()


class DiskSender(Sender):
    """``disk``: one safetensors file per version (the /dev/shm fallback)."""

    mode = "disk"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="mathpt-handoff-", dir=base))

    def setup_message(self) -> dict:
        return {"mode": self.mode, "layout": self.layout, "dir": str(self.dir)}

    def push(self, named, version) -> None:
        from safetensors.torch import save_file

        tensors = {n: t.detach().to(self.layout.dtype).contiguous() for n, t in named}
        tmp = self.dir / f".v{version}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, disk_path(self.dir, version))
        self.mailbox.acquire(self.check, self.timeout_s)
        try:
            self.mailbox.staged.value = version
            for f in self.dir.glob("v*.safetensors"):  # the worker reads only the staged file, under the lock
                if f.name != disk_path(self.dir, version).name:
                    f.unlink(missing_ok=True)
        finally:
            self.mailbox.lock.release()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def disk_path(d: str | Path, version: int) -> Path:
    return Path(d) / f"v{version}.safetensors"


class NcclSender(Sender):
    """``nccl``: broadcast a flat buffer from the trainer's GPU into the worker's staging buffer."""

    mode = "nccl"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.flat = torch.empty(self.layout.numel, dtype=self.layout.dtype, device=self.device)
        self.port = _free_port()
        self.pg = None

    def setup_message(self) -> dict:
        return {
            "mode": self.mode,
            "layout": self.layout,
            "backend": self.backend,
            "host": "127.0.0.1",
            "port": self.port,
            "timeout_s": self.timeout_s,
        }

    def connect(self) -> None:
        """Rank 0's half of the rendezvous (the worker's thread does rank 1's after the setup message)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.pg = make_process_group(self.backend, "127.0.0.1", self.port, 0, self.timeout_s)

    def push(self, named, version) -> None:
        self.layout.pack(named, self.flat)
        _sync(self.device)
        key = ("stage", version)
        self.send(key)
        work = self.pg.broadcast([self.flat], _bcast_opts(0))
        deadline = time.monotonic() + self.timeout_s
        acked, polls = False, 0
        while not work.is_completed():
            # The worker dies (check) or reports that its side failed (its error reply on the ack
            # queue): either way the broadcast would never complete, so neither may the wait.
            self.check()
            polls += 1
            if not acked and polls % 50 == 0:
                acked = self.wait_ack(key, 0.0)
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"nccl hand-off of weight version {version}: the broadcast to the inference worker "
                    f"did not complete within {self.timeout_s:.0f} s (runtime.handoff_timeout_s)"
                )
            time.sleep(0.0002)
        work.wait()
        if not acked:
            self.wait_ack(key)

    def close(self) -> None:
        if self.pg is not None and hasattr(self.pg, "abort") and self.backend == "nccl":
            try:
                self.pg.abort()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.pg = None


def _bcast_opts(root: int):
    import torch.distributed as dist

    o = dist.BroadcastOptions()
    o.rootRank = root
    o.rootTensor = 0
    return o


def make_sender(
    mode: str,
    layout: Layout,
    device: torch.device,
    mailbox: Mailbox,
    check,
    send,
    wait_ack,
    timeout_s: float = 600.0,
) -> Sender:
    args = (layout, device, mailbox, check, send, wait_ack)
    if mode in ("shm", "cuda_ipc"):
        if mode == "cuda_ipc" and device.type != "cuda":
            raise MathptError("handoff 'cuda_ipc' needs the trainer's model on a GPU")
        return SharedBufferSender(mode, *args, timeout_s=timeout_s)
    if mode == "disk":
        return DiskSender(*args, timeout_s=timeout_s)
    return NcclSender(*args, timeout_s=timeout_s)


# ---------------------------------------------------------------- worker side


class Receiver:
    """Worker side: knows where the staged version lives and applies it to the engine."""

    def __init__(self, msg: dict, device: str, mailbox: Mailbox):
        self.mode = msg["mode"]
        self.layout: Layout = msg["layout"]
        self.mailbox = mailbox
        self.device = torch.device(device)
        self.flat = None
        self.dir = msg.get("dir")
        self.pg = None
        if self.mode == "shm":
            self.flat = msg["flat"]
        elif self.mode == "cuda_ipc":
            import inspect

            fn, args = msg["ipc"]
            args = list(args)
            slot = list(inspect.signature(fn).parameters).index("storage_device")
            args[slot] = self.device.index or 0  # in this process's numbering (CUDA_VISIBLE_DEVICES)
            self.flat = fn(*args)
        elif self.mode == "nccl":
            self.flat = torch.empty(self.layout.numel, dtype=self.layout.dtype, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.pg = make_process_group(msg["backend"], msg["host"], msg["port"], 1, msg["timeout_s"])

    def receive(self, version: int) -> None:
        """``nccl`` only, in the worker's hand-off thread: fill the staging buffer under the lock."""
        with self.mailbox.lock:
            self.pg.broadcast([self.flat], _bcast_opts(0)).wait()
            _sync(self.flat.device)
            self.mailbox.staged.value = version

    def tensors(self, version: int) -> Iterable[tuple[str, torch.Tensor]]:
        if self.mode == "disk":
            from safetensors.torch import load_file

            dev = str(self.device) if self.device.type == "cuda" else "cpu"
            loaded = load_file(str(disk_path(self.dir, version)), device=dev)
            return [(s.name, loaded[s.name]) for s in self.layout.specs]
        return self.layout.views(self.flat)

    def apply_newest(self, engine) -> bool:
        """Between generations: load the staged version if it is newer than the engine's."""
        if self.mailbox.staged.value <= engine.weight_version:
            return False
        with self.mailbox.lock:
            version = self.mailbox.staged.value
            if version <= engine.weight_version:
                return False
            engine.load_weights(self.tensors(version), version)
            self.mailbox.applied.value = version
        return True

    def close(self) -> None:
        self.pg = None
        self.flat = None
