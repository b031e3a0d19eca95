"""Every shipped config validates and dry-runs; the schema describes every key and its defaults are
what validation fills in (jsonschema itself fills nothing)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from mathpt.config import ConfigError, apply_defaults, load_schema, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "config").glob("*.yaml") if p.name != "schema.yaml")
WORKFLOW_PARTS = ["Snakefile", "rules", "scripts", "config", "report", "profiles", "envs"]


def _nodes(node: dict, schema: dict, path: str = ""):
    """(key path, schema node with $ref merged) for every property in the schema."""
    from mathpt.config import _resolve

    node = _resolve(node, schema)
    for key, sub in node.get("properties", {}).items():
        p = f"{path}.{key}" if path else key
        yield p, _resolve(sub, schema)
        yield from _nodes(sub, schema, p)


def test_every_schema_key_is_described_and_every_default_is_valid():
    schema = load_schema()
    nodes = list(_nodes(schema, schema))
    assert len(nodes) > 100
    undescribed = [
        p for p, n in nodes if not isinstance(n.get("description"), str) or not n["description"].strip()
    ]
    assert undescribed == []
    for path, node in nodes:
        if "default" in node:
            sub = {k: v for k, v in node.items() if k != "default"}
            errors = list(
                jsonschema.Draft202012Validator({**sub, "$defs": schema["$defs"]}).iter_errors(
                    node["default"]
                )
            )
            assert not errors, f"{path}: default {node['default']!r} is invalid: {errors[0].message}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    validate_config(yaml.safe_load(path.read_text()))


def test_defaults_fill_only_what_is_absent():
    schema = {
        "$defs": {"block": {"type": "object", "properties": {"x": {"type": "integer", "default": 3}}}},
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "default": {},
                "properties": {"b": {"type": "integer", "default": 1}, "c": {"type": "integer"}},
            },
            "r": {"$ref": "#/$defs/block", "default": {}},
            "s": {"$ref": "#/$defs/block"},
            "n": {"type": ["object", "null"], "default": None, "properties": {"k": {"default": 9}}},
        },
    }
    assert apply_defaults({}, schema) == {"a": {"b": 1}, "r": {"x": 3}, "n": None}
    given = {"a": {"b": 5, "c": 2}, "r": {"x": 0}, "s": {}, "n": {}}
    assert apply_defaults(copy.deepcopy(given), schema) == {
        "a": {"b": 5, "c": 2},
        "r": {"x": 0},
        "s": {"x": 3},
        "n": {"k": 9},
    }
    assert (
        apply_defaults({"a": "not a mapping"}, schema)["a"] == "not a mapping"
    )  # left for validation to name
    first, second = apply_defaults({}, schema), apply_defaults({}, schema)
    first["a"]["b"] = 100
    assert second["a"]["b"] == 1  # defaults are copied, never shared


def test_a_minimal_config_gets_the_schema_defaults():
    cfg = {
        "experiment": "x",
        "model": {"kind": "tiny", "tiny": {}},
        "train": {
            "sft": {"lr": 1e-3, "epochs": 1},
            "pg": {"n_steps": 1, "rollout_batch_size": 8, "group_size": 4, "lr": 1e-5},
        },
    }
    validate_config(cfg)
    schema = load_schema()
    defaults = {p: n["default"] for p, n in _nodes(schema, schema) if "default" in n}

    def get(path):
        v = cfg
        for k in path.split("."):
            v = v[k]
        return v

    assert get("eval.lm_eval.num_fewshot") == defaults["eval.lm_eval.num_fewshot"]
    assert get("runtime.gpu_memory_utilization") == defaults["runtime.gpu_memory_utilization"]
    assert get("data.source") == "auto" and get("model.tiny.vocab_size") == defaults["model.tiny.vocab_size"]
    assert get("train.grpo_clip") == {"cliprange": 0.2} and get("teacher") == {
        "kind": "gold",
        "keep": "all",
        "unformatted_fraction": 0.0,
    }


def test_a_bad_value_still_names_its_key_after_defaults():
    cfg = yaml.safe_load(CONFIGS[0].read_text())
    cfg["runtime"]["job_timeout_s"] = -1
    cfg["data"]["limits"] = "all"
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "runtime.job_timeout_s" in str(e.value) and "data.limits" in str(e.value)
    with pytest.raises(ConfigError, match="expected a mapping"):
        validate_config(["not", "a", "mapping"])


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dryrun")
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / part)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_dry_runs(workflow_copy, path):
    """`snakemake -n` builds the whole DAG of each shipped config (no job runs, nothing is downloaded)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MATHPT_GSM8K_DIR", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "all",
            "-n",
            "--cores",
            "2",
            "--configfile",
            f"config/{path.name}",
        ],
        cwd=workflow_copy,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    for rule in ("data", "base_model", "traces", "tokenize", "train", "eval_gsm8k", "eval_lm", "ci_table"):
        assert rule in out, (rule, out[-2000:])


def test_a_misspelt_teacher_key_fails_validation_naming_it():
    cfg = yaml.safe_load((REPO / "config" / "qwen2.5-math-1.5b.yaml").read_text())
    cfg["teacher"]["concurency"] = 8
    with pytest.raises(ConfigError, match=r"config key 'teacher'.*concurency"):
        validate_config(cfg)


def test_unformatted_fraction_is_refused_for_a_non_gold_teacher_at_validation():
    cfg = yaml.safe_load((REPO / "config" / "qwen2.5-math-1.5b.yaml").read_text())
    validate_config(copy.deepcopy(cfg))  # the schema's default 0.0 is no error
    cfg["teacher"]["unformatted_fraction"] = 0.7
    with pytest.raises(ConfigError, match=r"teacher\.unformatted_fraction.*only the gold teacher"):
        validate_config(cfg)


def test_schema_teacher_keys_are_the_teachers_settings():
    """Every key a teacher reads is in the schema (which refuses others), and nothing more."""
    from dataclasses import fields

    from mathpt.teachers.api import APITeacherSettings
    from mathpt.teachers.local import LocalTeacherSettings

    schema = load_schema()
    in_schema = set(schema["properties"]["teacher"]["properties"])
    read = {"kind", "keep", "unformatted_fraction", "reasoning_source"}
    read |= {f.name for f in fields(APITeacherSettings)} | {f.name for f in fields(LocalTeacherSettings)}
    assert in_schema == read
