"""The training loops' settings, parsed once per run from the validated config slice.

A loop reads its block (``train.sft``, or ``train.pg`` merged with ``train.<algo>`` by
``mathpt.config.pg_config``) here, into frozen typed objects, and passes those down: the update,
the behaviour policy's old log-probs and the sampling read the same values, and nothing below the
loop indexes the config dict. There are no defaults here: ``validate_config`` filled every default
from config/schema.yaml, so a key that is missing is an error naming it. The only keys read as
optional are those the schema itself leaves absent on purpose (``OPTIONAL``): their absence means
"none" (no clip, the whole batch, no dynamic sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mathpt import algorithms
from mathpt.config import ConfigError
from mathpt.functional import LOSS_AGGREGATIONS, OFF_POLICY_CORRECTIONS, policy_loss

# keys with no schema default whose absence has a meaning (see each key's schema description)
OPTIONAL = frozenset(
    {
        "cliprange",  # no clip (the REINFORCE variants)
        "cliprange_low",  # = cliprange
        "cliprange_high",  # = cliprange
        "minibatch_size",  # the whole rollout batch
        "microbatch_size",  # the whole minibatch
        "max_draws",  # dynamic sampling (dapo) only
        "overlong_shaping",
        "overlong_buffer_fraction",
    }
)


def _reader(block: Mapping[str, Any], where: str):
    """``get(key)``: ``block[key]``, None for an absent ``OPTIONAL`` key, else a ConfigError naming it."""

    def get(key: str) -> Any:
        if key in block:
            return block[key]
        if key in OPTIONAL:
            return None
        raise ConfigError(
            f"config key '{where}.{key}' is missing (validate_config fills its default from config/schema.yaml)"
        )

    return get


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's settings (``mathpt.optim.make_optimizer`` reads these attributes)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float

    @classmethod
    def from_config(cls, block: Mapping[str, Any], where: str) -> OptimizerSettings:
        get = _reader(block, where)
        return cls(lr=get("lr"), betas=tuple(get("betas")), weight_decay=get("weight_decay"))


@dataclass(frozen=True)
class UpdateSettings:
    """What ``pg_update`` does with one rollout batch: the loss, its clip and aggregation, the cuts.

    One object instead of twenty keyword arguments, so the loop, the behaviour policy (which must cut
    a batch exactly as the update will) and the tests make the same call; the checks that used to
    run at every update run once, here. Per-step values (the shuffle seed, the scheduler) stay
    arguments of ``pg_update``.
    """

    loss_type: str  # an algorithm of mathpt.algorithms
    cliprange: float | None  # None: no clip
    cliprange_low: float | None  # None: cliprange
    cliprange_high: float | None  # None: cliprange
    epochs: int  # passes over the batch (train.pg.epochs_per_batch)
    minibatch_size: int | None  # None: the whole batch
    microbatch_size: int | None  # None: the whole minibatch
    microbatch_tokens: int | None  # token budget of a microbatch; None: microbatch_size rows
    packing: bool
    max_grad_norm: float | None  # None: no clipping
    loss_aggregation: str
    # sum_norm's constant (Dr. GRPO: the generation budget, max_new_tokens); token_mean always
    # divides by the minibatch's response tokens, seq_mean by each response's length
    normalize_constant: float
    off_policy_correction: str
    tis_cap: float

    def __post_init__(self) -> None:
        clips = policy_loss(self.loss_type).clips  # a ValueError for an unknown loss_type
        required = algorithms.get(self.loss_type).loss_aggregation
        if required is not None and self.loss_aggregation != required:
            raise ValueError(f"{self.loss_type} aggregates by {required!r}, not {self.loss_aggregation!r}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"unknown loss_aggregation {self.loss_aggregation!r}; expected one of {LOSS_AGGREGATIONS}"
            )
        if self.off_policy_correction not in OFF_POLICY_CORRECTIONS:
            raise ValueError(
                f"unknown off_policy_correction {self.off_policy_correction!r}; "
                f"expected one of {OFF_POLICY_CORRECTIONS}"
            )
        if clips and self.cliprange is None and self.cliprange_low is None:
            raise ValueError(
                f"loss_type {self.loss_type!r} needs cliprange (train.{self.loss_type}.cliprange)"
            )
        if not (self.microbatch_tokens is None or isinstance(self.microbatch_tokens, int)):
            raise ValueError(
                f"microbatch_tokens {self.microbatch_tokens!r}: a token count or None (the memory "
                "planner, mathpt.runtime.memory.resolve_memory, resolves 'auto' before settings are read)"
            )

    @property
    def clip_low(self) -> float | None:
        return self.cliprange if self.cliprange_low is None else self.cliprange_low

    @property
    def clip_high(self) -> float | None:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    @classmethod
    def from_config(cls, pg: Mapping[str, Any], where: str = "train.pg") -> UpdateSettings:
        """From a merged PG block (``mathpt.config.pg_config``: train.pg + train.<algo> + loss_type)."""
        get = _reader(pg, where)
        return cls(
            loss_type=get("loss_type"),
            cliprange=get("cliprange"),
            cliprange_low=get("cliprange_low"),
            cliprange_high=get("cliprange_high"),
            epochs=get("epochs_per_batch"),
            minibatch_size=get("minibatch_size"),
            microbatch_size=get("microbatch_size"),
            microbatch_tokens=get("microbatch_tokens"),
            packing=get("packing"),
            max_grad_norm=get("max_grad_norm"),
            loss_aggregation=get("loss_aggregation"),
            normalize_constant=float(get("max_new_tokens")),
            off_policy_correction=get("off_policy_correction"),
            tis_cap=get("tis_cap"),
        )

    def steps_per_batch(self, rollout_batch_size: int) -> int:
        """Optimizer steps on one rollout batch: epochs x minibatches."""
        return self.epochs * math.ceil(rollout_batch_size / (self.minibatch_size or rollout_batch_size))


def check_temperature(temperature: float) -> None:
    """Only T = 1 samples from the distribution the trainer scores.

    The ratio, the off-policy metrics and TIS compare the trainer's log-probs (softmax of the raw
    logits) with the behaviour policy's; at T != 1 the samples come from softmax(logits / T), and
    the engines' log-probs are of the raw distribution too (vLLM's default logprobs_mode), so every
    one of those numbers would be against the wrong policy. Rejected rather than silently wrong.
    """
    if temperature != 1.0:
        raise ConfigError(
            f"train.pg.temperature is {temperature}: policy-gradient rollouts must be sampled at "
            "temperature 1.0 (the trainer scores the untempered policy, so the ratio and TIS weights "
            "would be against another distribution)"
        )


@dataclass(frozen=True)
class PGSettings:
    """Everything ``train_pg`` reads from its slice, parsed once (see the module docstring)."""

    seed: int
    prompt_style: str
    algorithm: algorithms.Algorithm  # the registry entry: advantage estimator, dynamic sampling
    update: UpdateSettings
    optimizer: OptimizerSettings
    n_steps: int
    rollout_batch_size: int
    group_size: int
    max_new_tokens: int
    temperature: float
    staleness: int
    advantage_eps: float
    normalize_by_std: bool
    max_draws: int | None  # dynamic sampling only
    overlong_shaping: bool  # DAPO's soft overlong punishment
    overlong_buffer_fraction: float | None
    warmup_steps: int
    lr_decay: str
    eval_every: int
    val_max_new_tokens: int
    checkpoint_every: int

    def __post_init__(self) -> None:
        check_temperature(self.temperature)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PGSettings:
        """From the train rule's slice of a PG algorithm (``rule_slice(config, "train", algo=...)``)."""
        pg = cfg["pg"]
        get = _reader(pg, "train.pg")
        update = UpdateSettings.from_config(pg)
        return cls(
            seed=cfg["seed"],
            prompt_style=cfg["prompt_style"],
            update=update,
            optimizer=OptimizerSettings.from_config(pg, "train.pg"),
            n_steps=get("n_steps"),
            rollout_batch_size=get("rollout_batch_size"),
            group_size=get("group_size"),
            max_new_tokens=get("max_new_tokens"),
            temperature=get("temperature"),
            staleness=get("staleness"),
            advantage_eps=get("advantage_eps"),
            normalize_by_std=get("normalize_by_std"),
            max_draws=get("max_draws"),
            overlong_shaping=bool(get("overlong_shaping")),
            overlong_buffer_fraction=get("overlong_buffer_fraction"),
            warmup_steps=get("warmup_steps"),
            lr_decay=get("lr_decay"),
            eval_every=get("eval_every"),
            val_max_new_tokens=get("val_max_new_tokens"),
            checkpoint_every=get("checkpoint_every"),
            algorithm=algorithms.get(update.loss_type),
        )

    @property
    def n_prompts(self) -> int:
        """Prompts per rollout batch (each sampled ``group_size`` times)."""
        return self.rollout_batch_size // self.group_size

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the LR schedule's length)."""
        return self.n_steps * self.update.steps_per_batch(self.rollout_batch_size)


@dataclass(frozen=True)
class SFTSettings:
    """Everything ``train_sft`` reads from its slice, parsed once (see the module docstring)."""

    seed: int
    prompt_style: str
    optimizer: OptimizerSettings
    epochs: int
    microbatches_per_step: int
    microbatch_tokens: int | None
    packing: bool
    max_grad_norm: float | None
    warmup_steps: int
    eval_every: int
    val_max_new_tokens: int
    checkpoint_every: int
    lr_decay: ClassVar[str] = "cosine"  # SFT's schedule after the warm-up; not a setting

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SFTSettings:
        """From the train rule's slice of SFT (``rule_slice(config, "train", algo="sft")``)."""
        sft = cfg["sft"]
        get = _reader(sft, "train.sft")
        return cls(
            seed=cfg["seed"],
            prompt_style=cfg["prompt_style"],
            optimizer=OptimizerSettings.from_config(sft, "train.sft"),
            epochs=get("epochs"),
            microbatches_per_step=get("microbatches_per_step"),
            microbatch_tokens=get("microbatch_tokens"),
            packing=get("packing"),
            max_grad_norm=get("max_grad_norm"),
            warmup_steps=get("warmup_steps"),
            eval_every=get("eval_every"),
            val_max_new_tokens=get("val_max_new_tokens"),
            checkpoint_every=get("checkpoint_every"),
        )


def update_settings(algo: str, **overrides: Any) -> UpdateSettings:
    """``algo``'s UpdateSettings from config/schema.yaml's defaults (train.pg + train.<algo>), with
    ``overrides`` (train.pg keys) applied: the update the pipeline would run, without a config
    file (tests, benchmarks). The schema stays the one home of the defaults."""
    from mathpt.config import apply_defaults, load_schema, pg_config

    cfg = apply_defaults({"train": {"pg": {}}}, load_schema())
    return UpdateSettings.from_config({**pg_config(cfg, algo), **overrides})
