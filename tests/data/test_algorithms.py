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


def test_trainers_dispatch_by_registry():
    """scripts/train.py calls ``trainer(algo).run``: each entry loads its loop with the rule's inputs."""
    from mathpt.train.pg import train_pg
    from mathpt.train.sft import train_sft

    assert algorithms.trainer("sft").load() is train_sft
    for name in algorithms.PG_ALGOS:
        assert algorithms.trainer(name).load() is train_pg
    fake = algorithms.Trainer("x", "builtins:dict", (("shards_dir", "shards"),))
    seen = fake.run({"a": 1}, {"init": "i", "val_prompts": "v", "shards": "s"}, out_dir="o")
    assert seen == {"a": 1, "init_dir": "i", "val_prompts_path": "v", "shards_dir": "s", "out_dir": "o"}


def test_train_script_calls_the_algorithms_trainer(monkeypatch):
    """scripts/train.py with a Snakemake-like job: each algorithm reaches its loop with its inputs."""
    import importlib.util
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist

    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(algorithms.Trainer, "load", lambda self: lambda cfg, **kw: calls.append((self, kw)))
    paths = {"init": "i", "shards": "s", "train_prompts": "t", "val_prompts": "v"}
    smk = SimpleNamespace(
        input=Namedlist(fromdict=paths),
        output=SimpleNamespace(checkpoint="ck", metrics="runs/x/metrics.jsonl"),
        params=SimpleNamespace(state_dir="st"),
        threads=1,
    )
    for algo in ("sft", "grpo_clip"):
        cfg = {"algo": algo, "runtime": {"layout": "one_gpu"}, "wandb": {}, "experiment": "e"}
        script.main(smk, cfg)
    (sft, sft_kw), (pg, pg_kw) = calls
    assert sft is algorithms.SFT_TRAINER and pg is algorithms.PG_TRAINER
    assert sft_kw["shards_dir"] == "s" and "train_prompts_path" not in sft_kw
    assert pg_kw["train_prompts_path"] == "t" and "shards_dir" not in pg_kw
    assert sft_kw["init_dir"] == pg_kw["init_dir"] == "i" and sft_kw["out_dir"] == "ck"
