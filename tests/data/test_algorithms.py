"""The algorithm registry is the single source of algorithm names."""

import re
from pathlib import Path

import yaml

from mathpt import algorithms, functional

REPO = Path(__file__).resolve().parents[2]


def test_schema_enum_matches_registry():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    enum = schema["properties"]["train"]["properties"]["algorithms"]["items"]["enum"]
    assert tuple(enum) == algorithms.ALGOS


def test_every_pg_algorithm_has_a_loss():
    assert set(functional.LOSS_TYPES) == set(algorithms.PG_ALGOS)
    assert "sft" in algorithms.ALGOS and "sft" not in algorithms.PG_ALGOS


def test_model_names_round_trip_and_match_the_wildcard_regex():
    for algo in algorithms.ALGOS:
        for seed in (0, 7, 123):
            name = algorithms.model_name(algo, seed)
            assert algorithms.parse_model_name(name) == (algo, seed)
            assert re.fullmatch(algorithms.MODEL_REGEX, name)
    assert algorithms.parse_model_name("base") == ("base", None)
    assert re.fullmatch(algorithms.MODEL_REGEX, "base")
    assert not re.fullmatch(algorithms.MODEL_REGEX, "dpo-seed0")
    assert algorithms.label("grpo_clip") == "GRPO-clip" and algorithms.label("base") == "base"
