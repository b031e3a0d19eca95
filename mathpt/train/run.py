"""One training run's set-up and tear-down, the part the SFT and policy-gradient loops share.

Both loops start the same way: the policy on its device (on the cpu layout the cores are split
between the trainer and its inference worker, here and only here), AdamW and the learning-rate
schedule, the resumable state when there is one, the run's logger; then the inference worker and
the validation evals. Both end the same way: the last evals, the memory peaks and the run summary
while the worker is up, then the final checkpoint and the resumable state cleared. ``start_run``
does the first part and returns a ``RunContext``; ``RunContext.serve`` wraps the loop, starting the
worker, and saves the checkpoint when the loop ends without an error. What differs (the data, the
update, PG's behaviour copy) stays in the loops, which read top to bottom.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mathpt.engines.base import SamplingConfig
from mathpt.optim import lr_schedule, make_optimizer
from mathpt.runtime import InferenceClient
from mathpt.runtime.memory import MemoryPlan, log_peaks, log_plan
from mathpt.tracking import RunLogger
from mathpt.train.settings import PGSettings, SFTSettings
from mathpt.train.state import clear_state, load_state, save_final_checkpoint, save_state
from mathpt.train.validation import EvalTracker, load_prompts

log = logging.getLogger("mathpt.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RunContext:
    """The pieces of a run both loops hold: what ``start_run`` set up, the worker once ``serve`` runs."""

    cfg: dict  # the train slice, validated, `auto` memory settings filled (the worker, provenance)
    name: str  # the run's name (its output directory's)
    init_dir: str
    inputs: list[str]  # the files the checkpoint's provenance names
    out_dir: str
    state_dir: str
    memory: MemoryPlan | None
    model: torch.nn.Module
    tokenizer: object
    worker_device: str
    worker_threads: int | None  # the worker's share of the cores on the cpu layout
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resumed: dict | None  # the saved state's json (step, behaviour, ...), None for a fresh run
    logger: RunLogger
    total_steps: int  # the loop's steps
    client: InferenceClient | None = None  # while serve runs
    evals: EvalTracker | None = None  # while serve runs
    t_start: float = field(default=0.0)

    @property
    def start(self) -> int:
        """The first step to run: 0, or the step the resumed state was saved after."""
        return self.resumed["step"] if self.resumed else 0

    @contextmanager
    def serve(self, val_prompts_path: str, reward_fn, params: SamplingConfig) -> Iterator[EvalTracker]:
        """The inference worker and the validation evals around the loop; the final checkpoint after.

        Everything the trainer holds before its first step must be allocated before this starts the
        worker: on one GPU, vLLM counts memory that grows during its start-up profile as its own.
        """
        val = load_prompts(val_prompts_path)
        client_args = client_kwargs(self.cfg, self.init_dir, self.worker_device)
        with self.logger, InferenceClient(**client_args, worker_threads=self.worker_threads) as client:
            log_plan(self.logger, self.memory)
            self.client = client
            self.evals = EvalTracker(client, val, reward_fn, params, self.logger)
            yield self.evals
        save_final_checkpoint(self.model, self.tokenizer, self.out_dir, self.cfg, self.inputs)
        clear_state(self.state_dir)

    def steps(self, kind: str) -> tqdm:
        """The loop's steps from ``start`` on, as a progress bar; the run's wall clock starts here."""
        self.t_start = time.perf_counter()
        return tqdm(
            range(self.start, self.total_steps),
            desc=f"{kind} {self.name}",
            initial=self.start,
            total=self.total_steps,
        )

    def save_state(self, step: int, extra: dict | None = None, behaviour: dict | None = None) -> None:
        """Resumable state after ``step`` steps (``mathpt.train.state.save_state``)."""
        save_state(
            self.state_dir, self.model, self.optimizer, self.scheduler, step, extra, behaviour=behaviour
        )

    def finish(self, **summary) -> None:
        """The last evals, the memory peaks and the run summary (``summary``: the loop's own values)."""
        self.evals.finish()
        log_peaks(self.logger, self.memory, self.client, step=self.total_steps)
        self.logger.summary(
            {
                "steps": self.total_steps,
                "resumed_at": self.start,
                **summary,
                "wall_s": time.perf_counter() - self.t_start,
            }
        )


def start_run(
    cfg: dict,
    settings: PGSettings | SFTSettings,
    memory: MemoryPlan | None,
    *,
    total_steps: int,
    optimizer_steps: int,
    init_dir: str,
    inputs: list[str],
    out_dir: str,
    run_dir: str,
    state_dir: str,
    wandb_cfg: dict | None = None,
    group: str = "mathpt",
    log_config: dict | None = None,
    threads: int | None = None,
) -> RunContext:
    """Policy, optimizer, LR schedule (``optimizer_steps`` long), resumed state and logger of a run.

    ``memory``: the plan ``resolve_memory`` made (it filled ``cfg``'s ``auto`` settings before the
    loop parsed ``settings``); ``threads``: the cores of the job (the rule's ``threads``; None: this
    process's torch threads), split with the worker on the cpu layout.
    """
    model, tokenizer, worker_device, worker_threads = load_policy(cfg, init_dir, threads)
    optimizer = make_optimizer(model, settings.optimizer)  # fp32 master weights when the model is bf16
    # stepped once per optimizer step
    scheduler = lr_schedule(optimizer, settings.warmup_steps, optimizer_steps, decay=settings.lr_decay)
    resumed = load_state(state_dir, model, optimizer, scheduler)
    name = os.path.basename(os.path.normpath(out_dir))
    start = resumed["step"] if resumed else 0
    logger = RunLogger(
        run_dir,
        name=name,
        group=group,
        config=log_config or cfg,
        fresh=start == 0,
        resume_step=start or None,
        **wandb_kwargs(wandb_cfg),
    )
    return RunContext(
        cfg=cfg,
        name=name,
        init_dir=init_dir,
        inputs=inputs,
        out_dir=out_dir,
        state_dir=state_dir,
        memory=memory,
        model=model,
        tokenizer=tokenizer,
        worker_device=worker_device,
        worker_threads=worker_threads,
        optimizer=optimizer,
        scheduler=scheduler,
        resumed=resumed,
        logger=logger,
        total_steps=total_steps,
    )


def load_policy(
    cfg: dict, init_dir: str, threads: int | None = None
) -> tuple[torch.nn.Module, object, str, int | None]:
    """Seeded model + tokenizer from ``init_dir`` on the trainer's device, in train mode.

    Returns (model, tokenizer, worker_device, worker_threads): the layout decides where the trainer
    and the inference worker run; with the worker on the CPU the trainer takes its share of the
    cores now and ``worker_threads`` is the worker's (two processes with all cores each ran a PG
    step 10-30x slower). On CUDA each decoder layer is compiled (~30% faster, less activation
    memory: BENCHMARKS.md).
    """
    from mathpt.gpus import devices_for
    from mathpt.models import load_model, load_tokenizer
    from mathpt.runtime.worker import share_cpu_threads
    from mathpt.train.compile import compile_if_cuda

    set_seed(cfg["seed"])
    trainer_device, worker_device = devices_for(cfg["runtime"]["layout"])
    worker_threads = None
    if worker_device == "cpu":
        worker_threads = share_cpu_threads(threads or torch.get_num_threads())
    model = load_model(init_dir, dtype=DTYPES[cfg["dtype"]], device=trainer_device)
    model.train()
    compile_if_cuda(model)
    return model, load_tokenizer(init_dir), worker_device, worker_threads


def wandb_kwargs(wandb_cfg: dict | None) -> dict:
    """RunLogger's W&B arguments from the config's ``wandb`` block (disabled when absent)."""
    w = wandb_cfg or {"mode": "disabled", "project": "mathpt"}
    return {"wandb_mode": w["mode"], "project": w["project"]}


def client_kwargs(cfg: dict, model_path: str, worker_device: str) -> dict:
    """InferenceClient arguments for the trainer's worker, from the ``runtime`` block."""
    from mathpt.config import engine_kwargs
    from mathpt.runtime.memory import sleep_enabled

    rt = cfg["runtime"]
    sleep = sleep_enabled(cfg)
    kwargs = engine_kwargs(rt, rt["engine"])
    if sleep and rt["engine"] == "vllm":
        kwargs["enable_sleep_mode"] = True  # vLLM's own allocator, so sleep() can release the memory
    return {
        "engine": rt["engine"],
        "model_path": model_path,
        "device": worker_device,
        "handoff": rt["handoff"],
        "engine_kwargs": kwargs,
        "sleep_when_idle": sleep,
        "heartbeat_timeout_s": rt["heartbeat_timeout_s"],
        "job_timeout_s": rt["job_timeout_s"],
        "handoff_timeout_s": rt["handoff_timeout_s"],
    }


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
