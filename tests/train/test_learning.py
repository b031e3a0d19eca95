"""Proof that learning happens (issue 8), reduced to a few minutes on a 2-core CPU.

Unit tests cannot show that an RL loop learns, so this runs the real code paths end to end on the
synthetic arith task of ``config/arith.yaml``: data -> tiny base model -> gold traces (half of them
without the boxed answer format) -> SFT shards -> SFT -> greedy eval -> one GRPO-clip run from the
SFT checkpoint (inference worker process, weight hand-off, group-normalized rewards, two optimizer
steps per rollout batch) -> greedy eval again. It asserts what the issue asks: mean training
reward rises over the PG run, and held-out accuracy after PG exceeds the SFT starting point. The
reduction is only fewer PG steps and one PG variant; the full run and its table are in the README.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ALGO = "grpo_clip"
SEED = 0
PG_STEPS = 20


def learning_config() -> dict:
    """config/arith.yaml with one PG variant, fewer PG steps, and no evaluation or state saving
    inside the training loops (the test evaluates the final checkpoints itself)."""
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "arith.yaml").read_text()))
    cfg["train"]["algorithms"] = ["sft", ALGO]
    cfg["train"]["sft"].update(eval_every=10_000, checkpoint_every=10_000)
    cfg["train"]["pg"].update(n_steps=PG_STEPS, eval_every=10_000, checkpoint_every=10_000)
    return cfg


def test_arith_config_is_the_issue_8_experiment():
    """config/arith.yaml validates and runs what issue 8 asks: arith data, SFT then the three PG
    variants from the SFT checkpoint, enough test problems for paired CIs."""
    from mathpt.config import load_config

    cfg = load_config(REPO / "config" / "arith.yaml")
    assert cfg["data"]["source"] == "arith"
    assert cfg["train"]["pg_init"] == "sft"
    assert set(cfg["train"]["algorithms"]) == {"sft", "no_baseline", "reinforce_with_baseline", "grpo_clip"}
    assert cfg["data"]["arith"]["n_test"] >= 500 and cfg["data"]["limits"].get("test") is None
    assert cfg["model"]["kind"] == "tiny" and cfg["runtime"]["layout"] == "cpu"
    assert cfg["teacher"] == {"kind": "gold", "keep": "all", "unformatted_fraction": 0.7}
    pg = cfg["train"]["pg"]
    assert pg["rollout_batch_size"] > pg["minibatch_size"]  # several optimizer steps per rollout batch


def _eval(model_dir: Path, data_dir: Path, cfg: dict) -> list[dict]:
    from mathpt.evaluation.gsm8k_eval import run_gsm8k_eval
    from mathpt.io import read_jsonl

    g = cfg["eval"]["gsm8k"]
    rows, _ = run_gsm8k_eval(
        model_dir,
        read_jsonl(data_dir / "test.jsonl"),
        read_jsonl(data_dir / "train.jsonl"),
        k_shot=g["k_shot"],
        style=cfg["prompt_style"],
        max_new_tokens=g["max_new_tokens"],
        engine="hf",
        devices=["cpu"],
        inline=True,
        engine_kwargs={"max_model_len": cfg["runtime"]["max_model_len"]},
    )
    return rows


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory) -> dict:
    from mathpt.config import rule_slice, validate_config
    from mathpt.data import prepare_data
    from mathpt.io import read_jsonl
    from mathpt.models import materialize_base_model
    from mathpt.shards import write_prompt_set, write_sft_shards
    from mathpt.teachers.dispatch import generate_traces
    from mathpt.train.pg import train_pg
    from mathpt.train.sft import train_sft

    work = tmp_path_factory.mktemp("learning")
    cfg = learning_config()
    validate_config(cfg)
    d = rule_slice(cfg, "data")
    data = work / "data"
    prepare_data(
        {"name": "arith", **d["arith"]}, data, val_size=d["val_size"], seed=d["seed"], limits=d["limits"]
    )
    materialize_base_model(cfg["model"], data / "train.jsonl", work / "base")
    style = cfg["prompt_style"]
    generate_traces(
        cfg["teacher"], read_jsonl(data / "train.jsonl"), style, work / "traces.jsonl", work / "cache"
    )
    write_sft_shards(
        work / "traces.jsonl",
        work / "base",
        work / "shards",
        max_seq_len=cfg["tokenize"]["max_seq_len"],
        microbatch_size=cfg["tokenize"]["microbatch_size"],
    )
    for split in ("train", "val"):
        write_prompt_set(read_jsonl(data / f"{split}.jsonl"), style, work / f"{split}_prompts.jsonl")

    def dirs(run: str) -> dict:
        return dict(
            out_dir=str(work / "ckpt" / run),
            run_dir=str(work / "runs" / run),
            state_dir=str(work / "state" / run),
        )

    train_sft(
        rule_slice(cfg, "train", algo="sft", seed=SEED),
        init_dir=str(work / "base"),
        shards_dir=str(work / "shards"),
        val_prompts_path=str(work / "val_prompts.jsonl"),
        **dirs("sft"),
    )
    sft_rows = _eval(work / "ckpt" / "sft", data, cfg)
    train_pg(
        rule_slice(cfg, "train", algo=ALGO, seed=SEED),
        init_dir=str(work / "ckpt" / "sft"),
        train_prompts_path=str(work / "train_prompts.jsonl"),
        val_prompts_path=str(work / "val_prompts.jsonl"),
        **dirs(ALGO),
    )
    pg_rows = _eval(work / "ckpt" / ALGO, data, cfg)
    metrics = [json.loads(line) for line in open(work / "runs" / ALGO / "metrics.jsonl")]
    return {"cfg": cfg, "sft": sft_rows, "pg": pg_rows, "metrics": metrics}


@pytest.mark.slow
def test_pg_training_reward_rises(learning_run):
    train = sorted((m for m in learning_run["metrics"] if m.get("kind") == "train"), key=lambda m: m["step"])
    assert [m["step"] for m in train] == list(range(1, PG_STEPS + 1))
    k = len(train) // 4
    first = sum(m["reward_mean"] for m in train[:k]) / k
    last = sum(m["reward_mean"] for m in train[-k:]) / k
    assert last > first + 0.05, (first, last, [round(m["reward_mean"], 3) for m in train])
    fmt_first = sum(m["format_reward"] for m in train[:k]) / k
    fmt_last = sum(m["format_reward"] for m in train[-k:]) / k
    assert fmt_last > fmt_first + 0.1, (fmt_first, fmt_last)  # the habit SFT could not fix
    # GRPO-clip really took several optimizer steps per batch, with off-policy ratios (not == 1)
    assert all(m["optimizer_steps"] == 2 for m in train)
    assert max(m["ratio_max"] for m in train) > 1.0 and min(m["ratio_min"] for m in train) < 1.0


@pytest.mark.slow
def test_pg_beats_sft_on_held_out_problems(learning_run):
    sft, pg = learning_run["sft"], learning_run["pg"]
    assert [r["id"] for r in sft] == [r["id"] for r in pg]
    acc_sft = sum(r["correct"] for r in sft) / len(sft)
    acc_pg = sum(r["correct"] for r in pg) / len(pg)
    # SFT learns the arithmetic but, like 70% of its traces, mostly ends in plain words, which the
    # reward scores 0: its accuracy ignoring the format shows what it learned (issue 20)
    any_sft = sum(r["correct_any_format"] for r in sft) / len(sft)
    assert any_sft > 0.1, f"SFT learned little (accuracy ignoring format {any_sft:.3f}); PG vs SFT is vacuous"
    assert acc_pg > acc_sft + 0.03, (acc_sft, acc_pg)
