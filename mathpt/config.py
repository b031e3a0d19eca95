"""Config loading, schema validation, and the per-rule config slices.

Each Snakemake rule receives exactly the part of the config it depends on, as one canonical JSON
string (sorted keys), so Snakemake's params trigger reruns exactly what a change affects and
reordering keys in a YAML file reruns nothing (docs/design.md, "Config slices"). Defaults live in
config/schema.yaml only: validate_config fills them in, so code reads ``cfg["key"]`` directly.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

from mathpt import algorithms
from mathpt.algorithms import ALGOS, PG_ALGOS  # noqa: F401  (re-exported for callers)
from mathpt.io import MathptError

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "config" / "schema.yaml"


class ConfigError(MathptError):
    """The config does not match the schema; the message names the key path."""


def _resolve(node: dict, schema: dict) -> dict:
    """``node`` with a local ``$ref`` (``#/$defs/x``) merged in; the node's own keys win, and its
    ``properties`` are merged property by property (so a node can add defaults to a shared block)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    base = _resolve(target, schema)
    out = {**base, **{k: v for k, v in node.items() if k != "$ref"}}
    if "properties" in node and "properties" in base:
        props = dict(base["properties"])
        for key, sub in node["properties"].items():
            props[key] = {**props.get(key, {}), **sub}
        out["properties"] = props
    return out


def apply_defaults(config: dict, schema: dict) -> dict:
    """Fill in, in place, every absent key whose schema node has a ``default`` (recursively).

    jsonschema validates but never fills defaults; this step makes the schema the one place a
    default lives, so code reads ``cfg["key"]``. An absent object with a default (often ``{}``) is
    created and then filled itself. Values of the wrong type are left alone for validation to name.
    """

    def fill(value: Any, node: dict) -> None:
        node = _resolve(node, schema)
        if not isinstance(value, dict):
            return
        for key, sub in node.get("properties", {}).items():
            sub_r = _resolve(sub, schema)
            if key not in value and "default" in sub_r:
                value[key] = copy.deepcopy(sub_r["default"])
            if key in value:
                fill(value[key], sub_r)

    fill(config, schema)
    return config


def load_schema(schema_path: str | os.PathLike = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(schema_path).read_text())


def validate_config(config: dict, schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Fill the schema's defaults into ``config`` (in place), validate it against the JSON schema and
    the cross-key rules; raise ConfigError naming every bad key path."""
    import jsonschema

    if not isinstance(config, dict):
        raise ConfigError(f"invalid configuration: expected a mapping of keys, got {type(config).__name__}")
    schema = load_schema(schema_path)
    apply_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for e in errors:
            path = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            lines.append(f"  config key '{path}': {e.message}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _check_consistency(config)


def _check_consistency(config: dict) -> None:
    pg = config["train"]["pg"]
    if pg["rollout_batch_size"] % pg["group_size"]:
        raise ConfigError(
            f"config key 'train.pg.rollout_batch_size': {pg['rollout_batch_size']} is not a multiple of "
            f"train.pg.group_size ({pg['group_size']})"
        )
    for algo in PG_ALGOS:
        merged = pg_config(config, algo)
        if merged["rollout_batch_size"] % merged.get("minibatch_size", merged["rollout_batch_size"]):
            raise ConfigError(
                f"config key 'train.{algo}.minibatch_size': must divide train.pg.rollout_batch_size"
            )
        if merged.get("minibatch_size", 1) % merged.get("microbatch_size", 1):
            raise ConfigError(
                f"config key 'train.pg.microbatch_size': must divide the minibatch_size of {algo}"
            )
    teacher = config["teacher"]
    if teacher["kind"] != "gold" and teacher.get("unformatted_fraction", 0.0):
        raise ConfigError(
            f"config key 'teacher.unformatted_fraction': only the gold teacher takes it (teacher.kind is "
            f"{teacher['kind']!r}); remove the key"
        )
    rt = config["runtime"]
    eval_shards(config)  # an explicit num_shards beyond the layout's GPUs fails here
    if rt["sleep_between_rollouts"]:
        if rt["layout"] != "one_gpu":
            raise ConfigError(
                f"config key 'runtime.sleep_between_rollouts': only the one_gpu layout shares a GPU between "
                f"the trainer and the worker (runtime.layout is {rt['layout']}); set it to false"
            )
        trained_pg = [a for a in PG_ALGOS if a in config["train"]["algorithms"]]
        if trained_pg and config["train"]["pg"]["staleness"] != 0:
            raise ConfigError(
                "config key 'runtime.sleep_between_rollouts': the worker can only sleep while the trainer "
                "updates when they take turns (train.pg.staleness 0); staleness 1 overlaps them"
            )
    if config["model"]["kind"] == "pretrained" and not config["model"].get("path"):
        raise ConfigError("config key 'model.path': required when model.kind is 'pretrained'")
    if config["model"]["kind"] == "tiny" and not config["model"].get("tiny"):
        raise ConfigError("config key 'model.tiny': required when model.kind is 'tiny'")
    if config["train"]["pg_init"] == "sft" and "sft" not in config["train"]["algorithms"]:
        raise ConfigError("config key 'train.pg_init': 'sft' needs 'sft' in train.algorithms")
    for algo in PG_ALGOS:  # what defines an algorithm is not a setting (mathpt/algorithms.py)
        entry, merged = algorithms.get(algo), pg_config(config, algo)
        if entry.loss_aggregation and merged["loss_aggregation"] != entry.loss_aggregation:
            raise ConfigError(
                f"config key 'train.{algo}.loss_aggregation': {algo} is defined by "
                f"{entry.loss_aggregation!r}, got {merged['loss_aggregation']!r}"
            )
        own = config["train"].get(algo) or {}
        if "normalize_by_std" in own and entry.advantage != "group":
            raise ConfigError(
                f"config key 'train.{algo}.normalize_by_std': {algo}'s advantages are "
                f"{entry.advantage!r} (mathpt/algorithms.py), the std setting does not apply"
            )
        dynamic = {"max_draws", "overlong_shaping", "overlong_buffer_fraction"} & set(own)
        if dynamic and not entry.dynamic_sampling:
            raise ConfigError(
                f"config key 'train.{algo}.{sorted(dynamic)[0]}': only for dynamic sampling (dapo)"
            )
    # The final eval must let a model say what training let it say: a response that grew under RL
    # and is cut by a shorter eval budget counts as wrong, penalizing exactly the PG variants.
    eval_budget = config["eval"]["gsm8k"]["max_new_tokens"]
    for algo in (a for a in PG_ALGOS if a in config["train"]["algorithms"]):
        pg_budget = pg_config(config, algo)["max_new_tokens"]
        if eval_budget < pg_budget:
            raise ConfigError(
                f"config key 'eval.gsm8k.max_new_tokens': {eval_budget} is below train.pg.max_new_tokens "
                f"({pg_budget}, as {algo} trains with it): responses that grew under RL would be truncated "
                "and graded wrong; raise eval.gsm8k.max_new_tokens to at least the PG budget"
            )
        # The same for the validation curves: a budget below the rollouts' counts long answers wrong.
        val_budget = pg_config(config, algo)["val_max_new_tokens"]
        if val_budget < pg_budget:
            raise ConfigError(
                f"config key 'train.pg.val_max_new_tokens': {val_budget} is below train.pg.max_new_tokens "
                f"({pg_budget}, as {algo} trains with it): validation would truncate answers the rollouts "
                "allow and grade them wrong; raise train.pg.val_max_new_tokens to at least the PG budget"
            )


def load_config(path: str | os.PathLike) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    validate_config(config)
    return config


def gsm8k_local_dir(config: dict) -> str | None:
    """The local GSM8K directory: MATHPT_GSM8K_DIR wins over data.local_dir (resolved to absolute)."""
    d = os.environ.get("MATHPT_GSM8K_DIR") or config["data"]["local_dir"]
    return str(Path(d).resolve()) if d else None


def pg_config(config: dict, algo: str) -> dict:
    """Shared policy-gradient settings with the algorithm's overrides applied."""
    merged = {**config["train"]["pg"], **(config["train"].get(algo) or {})}
    merged["loss_type"] = algo
    return merged


def rule_slice(config: dict, rule: str, **wildcards: Any) -> dict:
    """The config slice that rule ``rule`` depends on (and nothing else)."""
    c = copy.deepcopy(config)
    style = c["prompt_style"]
    if rule == "data":
        d = c["data"]
        # The resolved directory is part of the slice: pointing MATHPT_GSM8K_DIR elsewhere reruns `data`.
        d["local_dir"] = gsm8k_local_dir(c) if d["source"] in ("local", "auto") else None
        if d["source"] != "arith":
            d.pop("arith", None)
        return d
    if rule == "base_model":
        return c["model"]
    if rule == "traces":
        return {"teacher": c["teacher"], "prompt_style": style, "runtime": _engine_slice(c)}
    if rule == "tokenize":
        return {"tokenize": c["tokenize"], "prompt_style": style, "keep": c["teacher"]["keep"]}
    if rule == "train":
        algo = wildcards["algo"]
        # experiment and wandb name and log the run: read by the job, so part of its slice.
        common = {
            "algo": algo,
            "seed": int(wildcards["seed"]),
            "dtype": c["train"]["dtype"],
            "prompt_style": style,
            "runtime": c["runtime"],
            "experiment": c["experiment"],
            "wandb": c["wandb"],
        }
        entry = algorithms.get(algo)
        trainer = entry.trainer
        if not entry.policy_gradient:
            return {**common, trainer.name: c["train"][trainer.name]}
        return {**common, trainer.name: pg_config(c, algo), "pg_init": c["train"]["pg_init"]}
    if rule == "eval_gsm8k":
        c["eval"]["gsm8k"]["num_shards"] = eval_shards(c)
        return {"gsm8k": c["eval"]["gsm8k"], "prompt_style": style, "runtime": _engine_slice(c)}
    if rule == "eval_lm":
        return {"lm_eval": c["eval"]["lm_eval"], "runtime": _engine_slice(c)}
    if rule in ("ci_table", "regressions"):
        return {
            "stats": c["stats"],
            "benchmark": "arith" if c["data"]["source"] == "arith" else "gsm8k",
            "gsm8k": c["eval"]["gsm8k"],
            "lm_eval": c["eval"]["lm_eval"],
            "prompt_style": style,
        }
    raise KeyError(f"no config slice defined for rule {rule!r}")


def eval_shards(config: dict) -> int:
    """GSM8K eval shards: ``auto`` = the GPUs the layout gives inference (one_gpu 1, two_gpu 2, cpu 1);
    an explicit value beyond the layout's GPUs is a config error (one_gpu asked for cuda:1 before)."""
    from mathpt.gpus import gpus_for

    layout, n = config["runtime"]["layout"], config["eval"]["gsm8k"]["num_shards"]
    gpus = gpus_for(layout, "train")  # every GPU of the layout is free for inference in an eval job
    if n == "auto":
        return max(1, gpus)
    if layout != "cpu" and n > gpus:
        raise ConfigError(
            f"config key 'eval.gsm8k.num_shards': {n} shards need {n} GPUs but runtime.layout {layout} "
            f"gives inference {gpus}; set it to auto or at most {gpus}"
        )
    return n


def engine_kwargs(runtime: dict, engine: str, *, raw_vllm: bool = False) -> dict:
    """Inference-engine constructor arguments from a ``runtime`` block: the one place they are built.

    ``max_model_len`` serves both engines; vLLM also gets ``gpu_memory_utilization`` (``auto``, unless
    the memory planner resolved it for a training job: 0.85 for an engine with a GPU to itself, the
    256 MiB default KV cache on cpu). mathpt's own
    VLLMEngine reads that setting on CPU as a fraction of RAM; ``raw_vllm=True`` is for callers that
    hand the arguments to ``vllm.LLM`` directly (lm-eval's vllm backend), so the translation is made here.
    """
    kwargs: dict[str, Any] = {"max_model_len": runtime["max_model_len"]}
    if engine != "vllm":
        return kwargs
    util = runtime["gpu_memory_utilization"]
    if util == "auto":
        from mathpt.runtime.memory import STANDALONE_UTILIZATION

        util = None if runtime["layout"] == "cpu" else STANDALONE_UTILIZATION
    if raw_vllm and runtime["layout"] == "cpu":
        from mathpt.engines.vllm_engine import cpu_kv_cache_bytes

        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=cpu_kv_cache_bytes(util))
    else:
        kwargs["gpu_memory_utilization"] = util
    return kwargs


def _engine_slice(c: dict) -> dict:
    r = c["runtime"]
    return {k: r[k] for k in ("layout", "engine", "gpu_memory_utilization", "max_model_len")}


def canonical(obj: Any) -> str:
    """The one canonical JSON string of a config slice."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
