"""The one registry of post-training algorithms: names, labels and run-name parsing.

Every other module (config validation, the loss dispatch, tables, curves, the Snakemake wildcard
regexes) takes the algorithm names from here, so adding an algorithm is one entry in ``ALGORITHMS``
plus its loss in ``mathpt.functional``. The schema's enum is checked against this list by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    label: str  # for plots and reports
    policy_gradient: bool  # trained from rollouts (train_pg) rather than from traces (train_sft)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sft", "SFT", policy_gradient=False),
        Algorithm("no_baseline", "REINFORCE (no baseline)", policy_gradient=True),
        Algorithm("reinforce_with_baseline", "REINFORCE + baseline", policy_gradient=True),
        Algorithm("grpo_clip", "GRPO-clip", policy_gradient=True),
    )
}
ALGOS: tuple[str, ...] = tuple(ALGORITHMS)
PG_ALGOS: tuple[str, ...] = tuple(a.name for a in ALGORITHMS.values() if a.policy_gradient)
BASE = "base"  # the untrained model every comparison starts from; not an algorithm

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
