"""The one registry of post-training algorithms: names, labels, trainers, losses and advantages.

Every other module (config validation, the trainer choice, the loss dispatch, the advantage
estimator, tables, curves, the Snakemake wildcard regexes) takes the algorithms from here, so adding
one is an entry in ``ALGORITHMS``, its loss in ``mathpt.functional.POLICY_LOSSES`` (and its advantage
estimator in ``ADVANTAGE_ESTIMATORS`` if new), its defaults in config/schema.yaml (``train.<name>``)
and a float64 test. The schema's enum is checked against this list by a test. No torch here: the
Snakefile imports this module, so a trainer names its loop by import path (loaded on ``run``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Trainer:
    """A training loop: ``entry`` ("module:function") called as
    ``fn(cfg, init_dir=, val_prompts_path=, <inputs>, out_dir=, run_dir=, state_dir=, ...)``."""

    name: str  # also its config block (train.<name>) and its key in the train rule's slice
    entry: str  # "module:function", imported on first use (torch stays out of the Snakefile)
    inputs: tuple[tuple[str, str], ...]  # (loop argument, train rule input) besides init and val prompts

    def load(self):
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)

    def run(self, cfg: dict, rule_inputs, **kwargs):
        """Call the loop; ``rule_inputs`` maps the rule's input names (``init``, ``val_prompts``
        and this trainer's ``inputs``) to paths."""
        own = {arg: rule_inputs[name] for arg, name in self.inputs}
        return self.load()(
            cfg, init_dir=rule_inputs["init"], val_prompts_path=rule_inputs["val_prompts"], **own, **kwargs
        )


SFT_TRAINER = Trainer("sft", "mathpt.train.sft:train_sft", (("shards_dir", "shards"),))  # from traces
PG_TRAINER = Trainer("pg", "mathpt.train.pg:train_pg", (("train_prompts_path", "train_prompts"),))
TRAINERS: dict[str, Trainer] = {t.name: t for t in (SFT_TRAINER, PG_TRAINER)}


@dataclass(frozen=True)
class Algorithm:
    name: str
    label: str  # for plots and reports
    trainer: Trainer  # the loop that trains it
    # policy gradient only:
    loss: str | None = None  # key of mathpt.functional.POLICY_LOSSES
    advantage: str | None = None  # key of mathpt.functional.ADVANTAGE_ESTIMATORS
    loss_aggregation: str | None = None  # the aggregation that defines the algorithm; None = config's
    dynamic_sampling: bool = False  # drop all-equal groups and draw more prompts (DAPO)
    reference: str = ""  # where the formula comes from (README "The algorithms, exactly")

    @property
    def policy_gradient(self) -> bool:
        """Trained from rollouts (train_pg) rather than from traces (train_sft)."""
        return self.trainer is PG_TRAINER


def _pg(name: str, label: str, loss: str, advantage: str, **kw) -> Algorithm:
    return Algorithm(name, label, PG_TRAINER, loss=loss, advantage=advantage, **kw)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sft", "SFT", SFT_TRAINER),
        # the four of the original study (CS336 assignment 5)
        _pg("no_baseline", "REINFORCE (no baseline)", "reinforce_raw", "group"),
        _pg("reinforce_with_baseline", "REINFORCE + baseline", "reinforce", "group"),
        _pg("grpo_clip", "GRPO-clip", "clip", "group"),
        # the peers' (issue 29)
        _pg(
            "dr_grpo",
            "Dr. GRPO",
            "clip",
            "group_mean",
            loss_aggregation="sum_norm",
            reference="Liu et al. 2025, Understanding R1-Zero-Like Training (arXiv:2503.20783)",
        ),
        _pg(
            "gspo",
            "GSPO",
            "gspo",
            "group",
            loss_aggregation="seq_mean",
            reference="Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071)",
        ),
        _pg(
            "rloo",
            "RLOO",
            "reinforce",
            "rloo",
            reference="Ahmadian et al. 2024, Back to Basics (arXiv:2402.14740); Kool et al. 2019",
        ),
        _pg(
            "dapo",
            "DAPO",
            "clip",
            "group",
            loss_aggregation="token_mean",
            dynamic_sampling=True,
            reference="Yu et al. 2025, DAPO (arXiv:2503.14476)",
        ),
        _pg(
            "cispo",
            "CISPO",
            "cispo",
            "group",
            loss_aggregation="token_mean",
            reference="MiniMax 2025, MiniMax-M1 (arXiv:2506.13585)",
        ),
    )
}
ALGOS: tuple[str, ...] = tuple(ALGORITHMS)
PG_ALGOS: tuple[str, ...] = tuple(a.name for a in ALGORITHMS.values() if a.policy_gradient)
BASE = "base"  # the untrained model every comparison starts from; not an algorithm


def get(name: str) -> Algorithm:
    """The registry entry of ``name``; a ValueError naming the known algorithms otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {ALGOS}") from None


def trainer(name: str) -> Trainer:
    """The loop that trains ``name`` (``SFT_TRAINER`` or ``PG_TRAINER``)."""
    return get(name).trainer


ALGO_REGEX = "|".join(ALGOS)  # for Snakemake wildcard_constraints
MODEL_REGEX = rf"{BASE}|({ALGO_REGEX})-seed\d+"
_RUN_NAME = re.compile(r"(?P<algo>.+)-seed(?P<seed>\d+)")


def model_name(algo: str, seed: int | None) -> str:
    """("grpo_clip", 3) -> "grpo_clip-seed3"; (algo, None) -> algo (e.g. "base")."""
    return algo if seed is None else f"{algo}-seed{seed}"


def parse_model_name(name: str) -> tuple[str, int | None]:
    """ "grpo_clip-seed3" -> ("grpo_clip", 3); a name without "-seedN" (e.g. "base") -> (name, None)."""
    m = _RUN_NAME.fullmatch(name)
    return (m["algo"], int(m["seed"])) if m else (name, None)


def label(name: str) -> str:
    """Display label of an algorithm name (the name itself when unknown, e.g. "base")."""
    return ALGORITHMS[name].label if name in ALGORITHMS else name
