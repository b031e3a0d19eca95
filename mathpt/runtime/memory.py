"""Plan one GPU's memory between the trainer and the vLLM worker before training starts.

On ``one_gpu`` the trainer and the inference worker share a card: vLLM takes
``runtime.gpu_memory_utilization`` x the card up front, and the trainer grows with its microbatch
token budget. Set by hand, the two met mid-run as a CUDA out-of-memory error (issue 25: the shipped
gpu-smoke config on one H100 80 GB). The planner adds up what each side needs from the model's
shape and the run's sizes, picks the worker's share and the token budgets left ``auto``, and refuses
a config that cannot fit before the first step, naming the keys to change. On ``two_gpu`` it checks
the trainer's card alone. It is an estimate calibrated on measured peaks, not a guarantee: the
measured peaks are logged beside it at the end of every run (``memory_plan`` / ``memory_peaks``).

Calibration (one H100 80 GB, 79.1 GiB seen by torch, vLLM 0.26.0, project at 4b658eb, bf16 with fp32
master weights, packed microbatches; docs/design.md "Memory plan"). The trainer's peak, allocated:

- gpu-smoke GRPO-clip (1.36 B params, staleness 1, microbatch_tokens 4096): 33.3 GiB;
- gpu-smoke SFT (no behaviour copy, microbatch_tokens 8192): 35.5 GiB;
- reference shape (Qwen2.5-Math-1.5B, 1.54 B params, GRPO-clip + TIS, staleness 1, 4096): 38.1 GiB;
- gpu-smoke GRPO-clip at 16384 went past 54.8 GiB (out of memory beside a 0.30 worker).

Take away the weights, master weights, moments, gradients and behaviour copy that existed then and
the chunked head's logits block: what remains is activation memory, 1.7-2.8 MiB per microbatch
token for that 28-layer, 1536-wide, 8960-MLP shape. ``ACT_CALIBRATION`` scales the per-layer
saved-tensor count ``6 hidden + 4 intermediate + 2 kv`` (bf16) so the largest of them (2.8 MiB,
the reference shape) is met; ``test_memory.py`` recomputes it from these figures.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mathpt.io import MathptError

log = logging.getLogger("mathpt.memory")

GIB = 1024**3
MIB = 1024**2

# The measured working points above, as (params, layers, hidden, intermediate, kv_dim, persistent
# bytes per param at the time, microbatch tokens, peak GiB). Persistent then: bf16 weights (2),
# fp32 masters + two moments (12), bf16 grads (2), behaviour copy (2, staleness 1 only).
MEASURED = {
    "gpu_smoke_grpo_clip": (1.3636e9, 28, 1536, 8960, 256, 18, 4096, 33.3),
    "gpu_smoke_sft": (1.3636e9, 28, 1536, 8960, 256, 16, 8192, 35.5),
    "reference_grpo_clip": (1.5437e9, 28, 1536, 8960, 256, 18, 4096, 38.1),
}
ACT_CALIBRATION = 1.16  # x bf16 saved tensors per layer per token (max over MEASURED; tested)
HEAD_BYTES = 2 * (1 << 27) * 4  # chunked log-prob head: one fp32 logits block and its gradient
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # per process: CUDA context, cuBLAS/NCCL workspaces (non-torch)
FRAGMENTATION = 1.10  # torch's caching allocator reserves more than the peak it allocates
VLLM_OVERHEAD_BYTES = int(2.5 * GIB)  # profile-run activations, sampler, CUDA graphs (in vLLM's budget)
VLLM_SLEEP_RESIDUE_BYTES = int(1.5 * GIB)  # what a level-1 sleeping worker keeps (estimate; measure)
HEADROOM_BYTES = 2 * GIB  # kept free on the card: estimates err, other processes start
MIN_CONCURRENCY = 64  # rollout rows the KV cache must hold at full length, at the least
PROMPT_TOKENS = 256  # prompt length assumed for rollouts (GSM8K r1_zero prompts: ~120-250 tokens)
STANDALONE_UTILIZATION = 0.85  # an engine with the GPU to itself (evals, two_gpu worker)
CPU_MICROBATCH_TOKENS = {"pg": 16384, "sft": 8192}  # what ``auto`` means on the cpu layout
TOKEN_CHOICES = (32768, 16384, 12288, 8192, 6144, 4096, 3072, 2048, 1024, 512)
MIN_SHARE, MAX_SHARE = 0.05, 0.90


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, from an HF ``config.json``."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int

    @classmethod
    def from_config(cls, c: dict) -> ModelShape:
        h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        head_dim = c.get("head_dim") or h // c["num_attention_heads"]
        kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
        per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # qkv (bias), o, mlp, norms
        params = v * h * (1 if c.get("tie_word_embeddings", True) else 2) + n * per_layer + h
        return cls(params, n, h, i, kv, v)

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelShape:
        return cls.from_config(json.loads(Path(model_dir, "config.json").read_text(encoding="utf-8")))

    def act_bytes_per_token(self) -> float:
        """Activation memory one microbatch token holds through the backward (bf16, calibrated)."""
        return ACT_CALIBRATION * 2 * self.layers * (6 * self.hidden + 4 * self.intermediate + 2 * self.kv_dim)

    def kv_bytes_per_token(self) -> int:
        """vLLM's KV cache per token (bf16 keys and values, every layer)."""
        return 2 * 2 * self.layers * self.kv_dim


def implied_calibration(name: str) -> float:
    """The ``ACT_CALIBRATION`` a measured working point implies (see MEASURED)."""
    params, layers, h, i, kv, per_param, tokens, peak = MEASURED[name]
    act = peak * GIB - per_param * params - HEAD_BYTES
    return act / tokens / (2 * layers * (6 * h + 4 * i + 2 * kv))


@dataclass
class MemoryPlan:
    """One card's budget (bytes) and the values chosen; ``lines()`` is the table in the job log."""

    layout: str
    total: int
    free: int
    kind: str  # "pg" or "sft"
    microbatch_tokens: int
    tokens_per_microbatch: int  # max(budget, the longest row, which runs alone)
    gpu_memory_utilization: float | None  # None: the worker is not on this card
    sleep: bool
    trainer: dict[str, int] = field(default_factory=dict)
    worker: dict[str, int] = field(default_factory=dict)
    kv_rows: float = 0.0  # rollout rows of full length the worker's KV cache holds
    chosen: dict[str, str] = field(default_factory=dict)  # key -> "auto" | "set"

    @property
    def trainer_bytes(self) -> int:
        return sum(self.trainer.values())

    @property
    def worker_bytes(self) -> int:
        return sum(self.worker.values())

    def peak_bytes(self) -> int:
        """The card's planned peak: the trainer's whole footprint beside the worker (awake or asleep)."""
        if self.gpu_memory_utilization is None:
            return self.trainer_bytes
        if self.sleep:  # trains beside the sleeping worker; generates beside the trainer's persistent state
            dynamic = self.trainer["activations"] + self.trainer["head"]
            return max(
                self.trainer_bytes + VLLM_SLEEP_RESIDUE_BYTES + CUDA_CONTEXT_BYTES,
                self.trainer_bytes - dynamic + self.worker_bytes,
            )
        return self.trainer_bytes + self.worker_bytes

    def record(self) -> dict[str, float]:
        """Numbers for the ``memory_plan`` row of metrics.jsonl (GiB unless named otherwise)."""
        out = {
            "total_gib": self.total / GIB,
            "free_gib": self.free / GIB,
            "planned_peak_gib": self.peak_bytes() / GIB,
            "trainer_gib": self.trainer_bytes / GIB,
            "worker_gib": self.worker_bytes / GIB,
            "microbatch_tokens": self.microbatch_tokens,
            "tokens_per_microbatch": self.tokens_per_microbatch,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_rows": round(self.kv_rows, 1),
            "sleep_between_rollouts": int(self.sleep),
        }
        out.update({f"trainer/{k}_gib": v / GIB for k, v in self.trainer.items()})
        out.update({f"worker/{k}_gib": v / GIB for k, v in self.worker.items()})
        return out

    def lines(self) -> list[str]:
        rows = [
            f"memory plan ({self.layout}, {self.kind}): card {self.total / GIB:.1f} GiB, free {self.free / GIB:.1f}"
        ]
        rows += [f"  trainer {k:<20} {v / GIB:6.2f} GiB" for k, v in self.trainer.items()]
        rows += [f"  worker  {k:<20} {v / GIB:6.2f} GiB" for k, v in self.worker.items()]
        util = "-" if self.gpu_memory_utilization is None else f"{self.gpu_memory_utilization:.2f}"
        rows.append(
            f"  planned peak {self.peak_bytes() / GIB:.1f} GiB of {self.free / GIB:.1f} free; "
            f"microbatch_tokens {self.microbatch_tokens} ({self.chosen[f'train.{self.kind}.microbatch_tokens']}), "
            f"gpu_memory_utilization {util} ({self.chosen['runtime.gpu_memory_utilization']}), "
            f"KV cache for {self.kv_rows:.0f} full-length rows"
        )
        return rows

    def as_dict(self) -> dict:
        return asdict(self)


def trainer_budget(
    shape: ModelShape, tokens: int, *, behaviour_copy: bool, fp32_grads: bool = True, bf16: bool = True
) -> dict[str, int]:
    """The trainer's bytes: weights, fp32 masters + AdamW moments, gradients, behaviour copy,
    activations of one microbatch of ``tokens`` tokens (with allocator slack), the chunked head."""
    p, w = shape.params, 2 if bf16 else 4
    out = {
        "weights": w * p,
        "master_and_moments": (12 if bf16 else 8) * p,
        "grads": w * p + (4 * p if fp32_grads and bf16 else 0),
        "behaviour_copy": w * p if behaviour_copy else 0,
        "activations": int(FRAGMENTATION * shape.act_bytes_per_token() * tokens),
        "head": HEAD_BYTES,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
    return out


def worker_budget(shape: ModelShape, share: float, total: int) -> dict[str, int]:
    """The worker's bytes at ``share`` of the card: vLLM takes exactly ``share x total`` (weights,
    overhead, and the KV cache gets the rest), plus its process's CUDA context."""
    weights = 2 * shape.params
    kv = max(0, int(share * total) - weights - VLLM_OVERHEAD_BYTES)
    return {
        "weights": weights,
        "overhead": VLLM_OVERHEAD_BYTES,
        "kv_cache": kv,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }


def share_for_rows(shape: ModelShape, rows: int, seq: int, total: int) -> float:
    """The worker share whose KV cache holds ``rows`` rows of ``seq`` tokens."""
    need = 2 * shape.params + VLLM_OVERHEAD_BYTES + rows * seq * shape.kv_bytes_per_token()
    return need / total


@dataclass(frozen=True)
class RunSizes:
    """What the run asks of memory, from its config slice."""

    kind: str  # pg | sft
    rows: int  # rollout rows per batch (pg); 0 for sft
    seq: int  # the longest row in tokens (prompt + response)
    behaviour_copy: bool
    sleep: bool
    bf16: bool

    @classmethod
    def of(cls, cfg: dict, max_seq_len: int | None = None) -> RunSizes:
        rt = cfg["runtime"]
        if "pg" in cfg:
            pg = cfg["pg"]
            seq = min(rt["max_model_len"], PROMPT_TOKENS + pg["max_new_tokens"])
            return cls(
                "pg",
                pg["rollout_batch_size"],
                seq,
                pg["staleness"] >= 1,
                sleep_enabled(cfg),
                cfg["dtype"] == "bfloat16",
            )
        return cls("sft", 0, max_seq_len or rt["max_model_len"], False, False, cfg["dtype"] == "bfloat16")


def sleep_enabled(cfg: dict) -> bool:
    """Whether the worker sleeps while this job trains: a PG job at staleness 0 on one_gpu that asked."""
    rt = cfg["runtime"]
    return bool(
        rt.get("sleep_between_rollouts")
        and rt["layout"] == "one_gpu"
        and "pg" in cfg
        and cfg["pg"]["staleness"] == 0
    )


def plan(
    shape: ModelShape,
    sizes: RunSizes,
    layout: str,
    free: int,
    total: int,
    microbatch_tokens: int | str | None,
    gpu_memory_utilization: float | str,
) -> MemoryPlan:
    """Choose the values left ``auto`` so the card's planned peak fits ``free``; raise MathptError
    naming the keys to change when no choice fits. ``microbatch_tokens`` None (rows, no token
    budget) is planned as the longest row."""
    key_mbt = f"train.{sizes.kind}.microbatch_tokens"
    shared = layout == "one_gpu"
    auto_mbt, auto_util = microbatch_tokens == "auto", gpu_memory_utilization == "auto"

    def build(tokens: int, share: float | None) -> MemoryPlan:
        per_micro = max(tokens, sizes.seq)
        trainer = trainer_budget(shape, per_micro, behaviour_copy=sizes.behaviour_copy, bf16=sizes.bf16)
        worker, kv_rows = {}, 0.0
        if share is not None:
            worker = worker_budget(shape, share, total)
            kv_rows = worker["kv_cache"] / (sizes.seq * shape.kv_bytes_per_token())
        return MemoryPlan(
            layout,
            total,
            free,
            sizes.kind,
            tokens,
            per_micro,
            share,
            sizes.sleep and shared,
            trainer,
            worker,
            kv_rows,
            {
                key_mbt: "auto" if auto_mbt else "set",
                "runtime.gpu_memory_utilization": "auto" if auto_util else "set",
            },
        )

    fits = _fits

    rows = sizes.rows or MIN_CONCURRENCY

    def share(n: int) -> float:  # the share (two decimals, rounded up) whose KV cache holds n rows
        return min(
            MAX_SHARE, max(MIN_SHARE, math.ceil(100 * share_for_rows(shape, n, sizes.seq, total)) / 100)
        )

    least, want = share(min(rows, MIN_CONCURRENCY)), share(rows)
    tokens = list(TOKEN_CHOICES) if auto_mbt else [int(microbatch_tokens or sizes.seq)]
    if not shared:  # two_gpu: the worker has its own card; only the trainer is planned here
        p = next((q for q in (build(t, None) for t in tokens) if fits(q)), None)
        if p is None and not auto_mbt:  # calibrated on one_gpu runs at 4096 tokens: warn, do not refuse
            p = build(tokens[0], None)
            log.warning(
                "memory plan: the trainer may need ~%.0f GiB at %s %d, more than the %.0f GiB free on its GPU",
                p.trainer_bytes / GIB,
                key_mbt,
                p.microbatch_tokens,
                free / GIB,
            )
        if p is None:
            q = build(tokens[-1], None)
            raise MathptError(
                f"the trainer needs ~{q.trainer_bytes / GIB:.0f} GiB at {key_mbt} {q.microbatch_tokens} "
                f"(longest row {sizes.seq} tokens) but its GPU has {free / GIB:.0f} GiB free; set a smaller "
                f"{key_mbt}, a shorter train.pg.max_new_tokens / tokenize.max_seq_len, or train a smaller model"
            )
        p.gpu_memory_utilization = None
        return p
    shares = _descending(want, least) if auto_util else [float(gpu_memory_utilization)]

    def first_fit(t: int) -> MemoryPlan | None:
        return next((q for q in (build(t, s) for s in shares) if fits(q)), None)

    best = None
    if auto_util and auto_mbt:  # KV cache for the whole batch, else half of it, at >= 4096 tokens
        for n in (rows, rows // 2):
            if n == rows or n >= MIN_CONCURRENCY:
                best = next((q for q in (build(t, share(n)) for t in tokens if t >= 4096) if fits(q)), None)
            if best is not None:
                break
    if best is None:  # else the largest token budget, beside the largest worker share that fits
        best = next((q for q in (first_fit(t) for t in tokens) if q is not None), None)
    if best is None:
        raise MathptError(
            _refusal(shape, sizes, free, total, microbatch_tokens, gpu_memory_utilization, build, least)
        )
    return best


def _fits(p: MemoryPlan) -> bool:
    return p.peak_bytes() + HEADROOM_BYTES <= p.free


def _descending(hi: float, lo: float) -> list[float]:
    """Worker shares from ``hi`` down to ``lo`` in steps of 0.01 (floored to two decimals)."""
    hi, lo = round(hi, 2), round(lo, 2)
    n = int(round((hi - lo) * 100))
    return [hi - i / 100 for i in range(n + 1)] if n >= 0 else [lo]


def _refusal(shape, sizes, free, total, mbt, util, build, least) -> str:
    """The error for a config that cannot fit: what it needs, and what would fit."""
    key_mbt = f"train.{sizes.kind}.microbatch_tokens"
    fixed_util = None if util == "auto" else float(util)
    tokens = sizes.seq if mbt in ("auto", None) else int(mbt)
    share = fixed_util if fixed_util is not None else least
    p = build(tokens, share)
    msg = (
        f"this run does not fit one {total / GIB:.0f} GiB GPU ({free / GIB:.0f} GiB free): "
        f"runtime.gpu_memory_utilization {share:.2f} gives the vLLM worker {share * total / GIB:.0f} GiB and "
        f"leaves {(free - p.worker_bytes) / GIB:.0f} GiB for the trainer, which needs ~{p.trainer_bytes / GIB:.0f} GiB "
        f"at {key_mbt} {tokens} (a {shape.params / 1e9:.2f} B model"
        + (", with the behaviour copy of staleness 1" if sizes.behaviour_copy else "")
        + ")"
    )
    hints = []
    if fixed_util is not None:  # what token budget fits at this share, and what share fits at this budget
        t_fit = next((t for t in TOKEN_CHOICES if _fits(build(t, fixed_util))), None)
        if t_fit is not None and t_fit < tokens:
            hints.append(f"set {key_mbt} <= {t_fit}")
        s_fit = next((s for s in _descending(fixed_util, least) if _fits(build(tokens, s))), None)
        if s_fit is not None:
            hints.append(f"runtime.gpu_memory_utilization <= {s_fit:.2f}")
        if not hints and _fits(build(TOKEN_CHOICES[-1], least)):
            hints.append(f"set runtime.gpu_memory_utilization and {key_mbt} to auto")
    elif _fits(build(TOKEN_CHOICES[-1], least)):
        hints.append(f"set {key_mbt} to auto (or smaller)")
    if hints:
        return msg + "; " + " or ".join(hints)
    return msg + (
        "; no token budget fits even beside the smallest worker share "
        f"({least:.2f}, KV cache for {min(sizes.rows or MIN_CONCURRENCY, MIN_CONCURRENCY)} rows): "
        "use a larger GPU, runtime.layout two_gpu, a smaller model, or "
        + ("train.pg.staleness 0 (no behaviour copy)" if sizes.behaviour_copy else "shorter rows")
    )


def card_memory(device: int = 0) -> tuple[int, int]:
    """(free, total) bytes of the trainer's GPU now (``torch.cuda.mem_get_info``)."""
    import torch

    return torch.cuda.mem_get_info(device)


def resolve_memory(cfg: dict, init_dir: str, max_seq_len: int | None = None) -> MemoryPlan | None:
    """Fill the train slice's ``auto`` memory settings in place and return the plan (None on cpu).

    Call it at job start, before the model is loaded: the plan reads the card's free memory. On the
    cpu layout ``auto`` token budgets become CPU_MICROBATCH_TOKENS and nothing is planned. Raises
    MathptError before training when the run cannot fit.
    """
    rt = cfg["runtime"]
    kind = "pg" if "pg" in cfg else "sft"
    block = cfg[kind]
    if rt["layout"] == "cpu":
        if block["microbatch_tokens"] == "auto":
            block["microbatch_tokens"] = CPU_MICROBATCH_TOKENS[kind]
        return None
    free, total = card_memory(0)
    p = plan(
        ModelShape.from_dir(init_dir),
        RunSizes.of(cfg, max_seq_len),
        rt["layout"],
        free,
        total,
        block["microbatch_tokens"],
        rt["gpu_memory_utilization"],
    )
    if block["microbatch_tokens"] is not None:
        block["microbatch_tokens"] = p.microbatch_tokens
    if p.gpu_memory_utilization is not None:
        rt["gpu_memory_utilization"] = p.gpu_memory_utilization
    elif rt["gpu_memory_utilization"] == "auto":  # two_gpu: the worker has its card to itself
        rt["gpu_memory_utilization"] = STANDALONE_UTILIZATION
    for line in p.lines():
        log.info(line)
    return p


def log_plan(logger, p: MemoryPlan | None) -> None:
    """The plan as one ``memory_plan`` row of metrics.jsonl (step 0)."""
    if p is not None:
        logger.record("memory_plan", p.record(), step=0)


def trainer_peaks() -> dict[str, float]:
    """This process's peak GPU memory on cuda:0 (torch's allocator), GiB; {} without CUDA."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {
        "trainer_max_allocated_gib": torch.cuda.max_memory_allocated(0) / GIB,
        "trainer_max_reserved_gib": torch.cuda.max_memory_reserved(0) / GIB,
    }


def peaks_so_far(client) -> dict[str, float]:
    """Trainer and worker peaks up to now (GiB), logged with every PG step so that a run killed before
    its end still shows them; {} on cpu."""
    return {
        **trainer_peaks(),
        **{f"worker_{k}": v for k, v in (getattr(client, "worker_memory", None) or {}).items()},
    }


def log_peaks(logger, p: MemoryPlan | None, client, step: int) -> dict[str, float]:
    """The measured peaks beside the plan: a ``memory_peaks`` row (trainer: torch's peaks; worker:
    what it reported with its last job), also logged as a line. Nothing on cpu."""
    if p is None:
        return {}
    row = peaks_so_far(client)
    row["planned_trainer_gib"] = p.trainer_bytes / GIB
    row["planned_worker_gib"] = p.worker_bytes / GIB
    logger.record("memory_peaks", row, step=step)
    log.info("memory peaks: %s", ", ".join(f"{k} {v:.2f}" for k, v in row.items() if v is not None))
    return row
