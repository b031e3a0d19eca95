"""Config loading, schema validation, and the per-rule config slices.

Each Snakemake rule receives exactly the part of the config it depends on, as one canonical JSON
string (sorted keys), so Snakemake's params trigger reruns exactly what a change affects and
reordering keys in a YAML file reruns nothing (see DESIGN.md).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

from mathpt.io import MathptError

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "config" / "schema.yaml"
PG_ALGOS = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
ALGOS = ("sft", *PG_ALGOS)


class ConfigError(MathptError):
    """The config does not match the schema; the message names the key path."""


def validate_config(config: dict, schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Validate against the JSON schema; raise ConfigError naming every bad key path."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
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
            raise ConfigError(f"config key 'train.{algo}.minibatch_size': must divide train.pg.rollout_batch_size")
        if merged.get("minibatch_size", 1) % merged.get("microbatch_size", 1):
            raise ConfigError(f"config key 'train.pg.microbatch_size': must divide the minibatch_size of {algo}")
    if config["model"]["kind"] == "pretrained" and not config["model"].get("path"):
        raise ConfigError("config key 'model.path': required when model.kind is 'pretrained'")
    if config["model"]["kind"] == "tiny" and not config["model"].get("tiny"):
        raise ConfigError("config key 'model.tiny': required when model.kind is 'tiny'")
    if config["train"]["pg_init"] == "sft" and "sft" not in config["train"]["algorithms"]:
        raise ConfigError("config key 'train.pg_init': 'sft' needs 'sft' in train.algorithms")


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
    d = os.environ.get("MATHPT_GSM8K_DIR") or config["data"].get("local_dir")
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
        d["local_dir"] = gsm8k_local_dir(c) if d["source"] == "local" else None
        if d["source"] != "arith":
            d.pop("arith", None)
        return d
    if rule == "base_model":
        return c["model"]
    if rule == "traces":
        return {"teacher": c["teacher"], "prompt_style": style, "runtime": _engine_slice(c)}
    if rule == "tokenize":
        return {"tokenize": c["tokenize"], "prompt_style": style, "keep": c["teacher"].get("keep", "all")}
    if rule == "train":
        algo = wildcards["algo"]
        common = {"algo": algo, "seed": int(wildcards["seed"]), "dtype": c["train"]["dtype"],
                  "prompt_style": style, "runtime": c["runtime"]}
        if algo == "sft":
            return {**common, "sft": c["train"]["sft"]}
        return {**common, "pg": pg_config(c, algo), "pg_init": c["train"]["pg_init"]}
    if rule == "eval_gsm8k":
        return {"gsm8k": c["eval"]["gsm8k"], "prompt_style": style, "runtime": _engine_slice(c)}
    if rule == "eval_lm":
        return {"lm_eval": c["eval"]["lm_eval"], "runtime": _engine_slice(c)}
    if rule in ("ci_table", "regressions"):
        return {"stats": c["stats"], "gsm8k": c["eval"]["gsm8k"], "lm_eval": c["eval"]["lm_eval"],
                "prompt_style": style}
    raise KeyError(f"no config slice defined for rule {rule!r}")


def _engine_slice(c: dict) -> dict:
    r = c["runtime"]
    return {k: r.get(k) for k in ("layout", "engine", "gpu_memory_utilization", "max_model_len")}


def canonical(obj: Any) -> str:
    """The one canonical JSON string of a config slice."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
