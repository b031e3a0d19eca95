"""Experiment tracking: a local ``metrics.jsonl`` per run, mirrored to Weights & Biases.

``metrics.jsonl`` is the source of truth (curves and the report read it; nothing depends on W&B).
Rows are ``{"kind": "train"|"eval", "step": int, "time": unix seconds, <metric>: number|null}``;
an eval row's ``step`` is the optimizer step whose weights were evaluated, not the step at which
the result arrived (evals run asynchronously on the inference device).

W&B gets one run per (algorithm, seed), grouped by experiment, with the scrubbed config. Train
metrics are logged as ``train/<key>`` against ``train/step`` and eval metrics as ``eval/<key>``
against ``eval/step`` (``define_metric``), so a late eval result is drawn at the step it belongs to.
Offline mode (the default) writes ``<run_dir>/wandb/offline-run-*``; upload later with::

    wandb sync results/runs/<run>/wandb/offline-run-*     # resumed runs: all dirs, synced in order

Set ``wandb.mode: online`` in the config (after ``wandb login`` or with ``WANDB_API_KEY`` in the
environment) to stream live; ``disabled`` turns W&B off. The W&B run id is kept in
``<run_dir>/wandb_run_id.txt`` so a resumed training continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from mathpt.io import (
    DataError,
    MathptError,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl_numbered,
    read_json,
)
from mathpt.secrets import scrub

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_ID_FILE = "wandb_run_id.txt"
RESERVED_KEYS = ("kind", "step", "time")

# Metric names the trainers log each optimizer step (documented here so trainers, curves and the
# report agree). Any other numeric key is accepted too.
TRAIN_METRICS = (
    "loss",
    "lr",
    "grad_norm",
    "reward_mean",
    "reward_std",
    "format_reward",
    "answer_reward",
    "entropy",
    "clip_fraction",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "response_length_mean",
    "response_length_max",
    "truncated_fraction",
    "tokens_per_s",
    "handoff_s",
    "generation_s",
    "trainer_idle_s",
)
# Eval metrics, keyed by the step of the evaluated weights: "accuracy" is validation accuracy.
EVAL_METRICS = ("accuracy", "format_rate", "response_length_mean", "truncated_fraction")

WandbMode = Literal["offline", "online", "disabled"]


def _number(key: str, value: Any) -> float | int | None:
    """A JSON-safe number for ``value`` (tensor, numpy scalar, int, float, bool); non-finite -> None."""
    if value is None:
        return None
    if hasattr(value, "item"):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise MathptError(
                f"metric {key!r}: expected a scalar, got {type(value).__name__} "
                f"with shape {getattr(value, 'shape', '?')}"
            ) from None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise MathptError(f"metric {key!r}: expected a number, got {type(value).__name__} ({value!r})")


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (optionally only one ``kind``), in file order.

    An unterminated last line is a write in progress (or cut by a crash) and is skipped; any other
    malformed line raises DataError naming ``file:line``.
    """
    rows = []
    for lineno, row in iter_jsonl_numbered(path, skip_torn_tail=True):
        if "kind" not in row or "step" not in row:
            raise DataError(f"{path}:{lineno}: expected an object with 'kind' and 'step'")
        if kind is None or row["kind"] == kind:
            rows.append(row)
    return rows


class RunLogger:
    """Log one training run to ``<run_dir>/metrics.jsonl`` and (unless disabled) to a W&B run.

    Use as a context manager. Constructing it on an existing ``run_dir`` continues the run (rows are
    appended, the W&B id is reused); call ``truncate_after(step)`` (or pass ``resume_step``) when
    resuming from a checkpoint so rows from steps that will be redone are dropped, or pass
    ``fresh=True`` to start over (clears metrics, summary and the W&B id).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        name: str,
        group: str | None = None,
        project: str = "mathpt",
        config: Mapping[str, Any] | None = None,
        wandb_mode: WandbMode = "offline",
        wandb_dir: str | os.PathLike | None = None,
        entity: str | None = None,
        tags: Iterable[str] = (),
        resume_step: int | None = None,
        fresh: bool = False,
    ) -> None:
        if wandb_mode not in ("offline", "online", "disabled"):
            raise MathptError(f"wandb mode must be 'offline', 'online' or 'disabled', got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._lock = threading.Lock()
        self._file = None
        self._wandb_run = None
        self.name = name
        if fresh:
            for p in (self.metrics_path, self.summary_path, self.run_dir / RUN_ID_FILE):
                p.unlink(missing_ok=True)
        self._repair_tail()
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._open()
        if wandb_mode != "disabled":
            self._init_wandb(
                name=name,
                group=group,
                project=project,
                entity=entity,
                tags=list(tags),
                config=scrub(dict(config or {})),
                mode=wandb_mode,
                wandb_dir=Path(wandb_dir) if wandb_dir else self.run_dir,
            )

    # ---- local file -------------------------------------------------------------------------------
    def _repair_tail(self) -> None:
        """Drop a torn last line (a crash mid-write) so appended rows start on a fresh line."""
        if not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            warnings.warn(
                f"{self.metrics_path}: dropping an unterminated last line "
                f"({len(data) - len(keep)} bytes, from an interrupted write)",
                stacklevel=3,
            )
            atomic_write_text(self.metrics_path, keep.decode("utf-8"))

    def _open(self) -> None:
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def truncate_after(self, step: int) -> int:
        """Drop every row (train and eval) with ``step > step``; returns how many were dropped.

        Eval rows are dropped too: they describe weights that the resumed run will recompute.
        W&B history cannot be rewritten offline; the resumed run simply logs those steps again.
        """
        with self._lock:
            if self._file is not None:
                self._file.close()
            dropped = 0
            if self.metrics_path.exists():
                rows = read_metrics(self.metrics_path)
                kept = [r for r in rows if r["step"] <= step]
                dropped = len(rows) - len(kept)
                atomic_write_text(
                    self.metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
                )
            if self._file is not None:
                self._open()
            return dropped

    def _write(self, kind: str, step: int, metrics: Mapping[str, Any]) -> dict:
        if isinstance(step, bool) or not isinstance(step, int):
            raise MathptError(f"{kind} step must be an int, got {step!r}")
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise MathptError(f"metric name(s) {clash} are reserved in {self.metrics_path}")
        values = {str(k): _number(str(k), v) for k, v in metrics.items()}
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self._lock:
            if self._file is None:
                raise MathptError(f"{self.metrics_path}: logger is closed")
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()  # one row per line, on disk at once: a crash loses at most this row
        return values

    # ---- W&B --------------------------------------------------------------------------------------
    def _run_id(self) -> str:
        path = self.run_dir / RUN_ID_FILE
        if path.exists() and (rid := path.read_text().strip()):
            return rid
        rid = uuid.uuid4().hex[:12]
        atomic_write_text(path, rid + "\n")
        return rid

    def _init_wandb(
        self,
        *,
        name: str,
        group: str | None,
        project: str,
        entity: str | None,
        tags: list[str],
        config: dict,
        mode: str,
        wandb_dir: Path,
    ) -> None:
        try:
            import wandb

            wandb_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                group=group,
                tags=tags or None,
                config=config,
                id=self._run_id(),
                resume="allow",
                mode=mode,
                dir=str(wandb_dir),
                reinit="create_new",
            )
            run.define_metric("train/step")
            run.define_metric("train/*", step_metric="train/step")
            run.define_metric("eval/step")
            run.define_metric("eval/*", step_metric="eval/step")
            self._wandb_run = run
        except Exception as e:  # noqa: BLE001 -- any W&B failure must not cost the local metrics
            if mode == "online":
                raise MathptError(
                    f"W&B run {name!r} failed to start online ({type(e).__name__}: {e}); "
                    "run `wandb login`, or set wandb.mode to 'offline' in the config"
                ) from e
            warnings.warn(
                f"W&B ({mode}) failed to start for run {name!r}: {type(e).__name__}: {e}; "
                f"continuing with {self.metrics_path} only",
                stacklevel=3,
            )

    @property
    def wandb_run(self) -> Any:
        """The live ``wandb.Run`` (None when disabled or when W&B failed to start)."""
        return self._wandb_run

    def _wandb_log(self, prefix: str, step: int, values: Mapping[str, Any]) -> None:
        if self._wandb_run is None:
            return
        payload = {f"{prefix}/{k}": v for k, v in values.items() if v is not None}
        payload[f"{prefix}/step"] = step
        try:
            self._wandb_run.log(payload)
        except Exception as e:  # noqa: BLE001 -- keep training; metrics.jsonl already has the row
            warnings.warn(
                f"W&B log failed for run {self.name!r} ({e}); W&B disabled for this run, "
                f"{self.metrics_path} keeps every row",
                stacklevel=3,
            )
            self._wandb_run = None

    # ---- public API -------------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record train metrics of optimizer step ``step`` (see TRAIN_METRICS for the usual keys)."""
        from mathpt import timing

        timing.mark("first_step")
        self._wandb_log("train", step, self._write("train", step, metrics))

    def log_eval(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record eval metrics of the weights from optimizer step ``step`` (whenever they arrive)."""
        self._wandb_log("eval", step, self._write("eval", step, metrics))

    def record(self, kind: str, metrics: Mapping[str, Any], step: int) -> None:
        """Record a row of another ``kind`` (``memory_plan``, ``memory_peaks``): metrics.jsonl only."""
        self._write(kind, step, metrics)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Merge final values (best accuracy, total time...) into ``summary.json`` and the W&B summary."""
        values = scrub(dict(values))
        current = read_json(self.summary_path) if self.summary_path.exists() else {}
        current.update(values)
        atomic_write_json(self.summary_path, current)
        if self._wandb_run is not None:
            try:
                self._wandb_run.summary.update(values)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"W&B summary update failed for run {self.name!r}: {e}", stacklevel=2)

    def close(self, exit_code: int = 0) -> None:
        """Close the metrics file and finish the W&B run (``exit_code != 0`` marks it failed)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        run, self._wandb_run = self._wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"W&B finish failed for run {self.name!r}: {e}", stacklevel=2)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
