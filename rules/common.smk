# Helpers shared by all rules: config validation, the per-rule config slices, names and paths.
import sys

sys.path.insert(
    0, workflow.basedir
)  # import mathpt from the checkout even if not installed

from mathpt.algorithms import (
    ALGO_REGEX,
    MODEL_REGEX,
    PG_ALGOS as ALL_PG_ALGOS,
    get as get_algorithm,
)
from mathpt.config import canonical, eval_shards, rule_slice, validate_config
from mathpt.gpus import gpus_for

validate_config(config)

LAYOUT = config["runtime"]["layout"]
ALGOS = config["train"]["algorithms"]
SEEDS = config["train"]["seeds"]
PG_ALGOS = [a for a in ALGOS if a in ALL_PG_ALGOS]
RUNS = [f"{a}-seed{s}" for a in ALGOS for s in SEEDS]
MODELS = ["base"] + RUNS
SHARDS = eval_shards(config)  # auto: the GPUs the layout gives inference
# Threads of an eval job. With GPUs, every core: the GPUs are what jobs share (`resources: gpu`). On
# the cpu layout, half the cores (at least one), so that two evals run at once and one's start-up
# (imports, model and engine loads, most of a small eval job, on one thread) overlaps the other's
# work. Train jobs keep every core: their trainer and inference worker split them, and two PG jobs
# side by side ran slower than one after the other. `--set-threads eval_gsm8k=N` overrides.
EVAL_THREADS = workflow.cores if LAYOUT != "cpu" else max(1, workflow.cores // 2)


wildcard_constraints:
    algo=ALGO_REGEX,
    seed=r"\d+",
    model=MODEL_REGEX,


def slice_of(rule, **wildcards):
    """The rule's config slice as one canonical JSON string (docs/design.md, "Config")."""
    return canonical(rule_slice(config, rule, **wildcards))


def model_dir(wildcards):
    if wildcards.model == "base":
        return "results/models/base"
    return f"results/checkpoints/{wildcards.model}"


def train_init(wildcards):
    """PG runs start from the base model, or from the SFT checkpoint of the same seed."""
    if (
        get_algorithm(wildcards.algo).policy_gradient
        and config["train"]["pg_init"] == "sft"
    ):
        return f"results/checkpoints/sft-seed{wildcards.seed}"
    return "results/models/base"


def infer_gpus():
    """GPUs of a GSM8K eval job: one per shard (eval_shards keeps them within the layout's GPUs)."""
    return SHARDS if LAYOUT != "cpu" else 0
