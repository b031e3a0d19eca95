"""RunLogger (metrics.jsonl + offline W&B) and secret scrubbing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mathpt.io import DataError, MathptError
from mathpt.secrets import MASK, is_secret_key, redact, scrub, secret_values
from mathpt.tracking import EVAL_METRICS, TRAIN_METRICS, RunLogger, read_metrics

CFG_SECRET = "sk-cfgsecret-0123456789abcdefXYZ"
ENV_SECRET = "env-secret-value-5f1e9c2b7a"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B offline, quiet and inside tmp_path (config, cache and data dirs included)."""
    for var, sub in (
        ("WANDB_DIR", "wandb_default"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def fake_metrics(step: int, rng: np.random.Generator) -> dict:
    return {k: float(rng.uniform(0.1, 1.0)) for k in TRAIN_METRICS} | {"response_length_max": step + 10}


def inspect_wandb(run_dir: Path) -> list[dict]:
    """Records of an offline run's .wandb log, read with wandb's own reader (`wandb leet inspect`)."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_offline_wandb_run_has_keys_and_no_secret(wandb_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_SECRET)
    run_dir = wandb_env / "results" / "train" / "grpo_clip-seed0"
    config = {
        "algorithm": "grpo_clip",
        "seed": 0,
        "lr": 1e-5,
        "max_tokens": 256,
        "teacher": {"api_key": CFG_SECRET, "api_key_env": "OPENAI_API_KEY"},
    }
    rng = np.random.default_rng(0)
    logged = {}
    with RunLogger(run_dir, name="grpo_clip-seed0", group="exp-test", config=config) as lg:
        for step in range(6):
            logged[step] = fake_metrics(step, rng)
            lg.log(logged[step], step=step)
            if step == 4:  # eval of step-2 weights arrives late, after step 4
                lg.log_eval({"accuracy": 0.25, "format_rate": 0.5}, step=2)
        lg.log_eval({"accuracy": 0.5}, step=5)
        lg.summary({"best_accuracy": 0.5, "teacher_token": ENV_SECRET})

    # metrics.jsonl: every train row and both evals, evals keyed by the weights' step
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(6))
    for r in train:
        assert {k: r[k] for k in TRAIN_METRICS} == pytest.approx(logged[r["step"]])
    assert [(r["step"], r["accuracy"]) for r in rows if r["kind"] == "eval"] == [(2, 0.25), (5, 0.5)]

    # the W&B offline run dir, read back with wandb's own reader
    run_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("run-*.wandb"))
    records = inspect_wandb(run_dirs[0])
    run_rec = next(r["run"] for r in records if r["type"] == "run")
    assert run_rec["display_name"] == "grpo_clip-seed0" and run_rec["run_group"] == "exp-test"
    cfg = run_rec["config"]["update"]
    assert cfg["lr"] == 1e-5 and cfg["max_tokens"] == 256 and cfg["teacher"]["api_key"] == MASK
    assert cfg["teacher"]["api_key_env"] == "OPENAI_API_KEY"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    train_hist = {h["train/step"]: h for h in history if "train/step" in h}
    assert sorted(train_hist) == list(range(6))
    for step, h in train_hist.items():
        assert {k: h[f"train/{k}"] for k in TRAIN_METRICS} == pytest.approx(logged[step])
    evals = [(h["eval/step"], h["eval/accuracy"]) for h in history if "eval/step" in h]
    assert evals == [(2, 0.25), (5, 0.5)]
    metrics = {
        r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in records if r["type"] == "metric"
    }
    assert metrics["train/*"] == "train/step" and metrics["eval/*"] == "eval/step"
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_rec["run_id"]

    # no secret anywhere we wrote (run dir, W&B dirs), in any file
    files = [p for p in wandb_env.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for p in files:
        data = p.read_bytes()
        assert CFG_SECRET.encode() not in data, p
        assert ENV_SECRET.encode() not in data, p


def test_resume_continues_wandb_run_and_truncates(wandb_env):
    run_dir = wandb_env / "run"
    with RunLogger(run_dir, name="sft-seed1", group="g", config={"lr": 1.0}) as lg:
        for step in range(5):
            lg.log({"loss": float(step)}, step=step)
        lg.log_eval({"accuracy": 0.1}, step=4)
    rid = (run_dir / "wandb_run_id.txt").read_text().strip()
    # crash after checkpoint 2: steps 3, 4 (and the eval of step-4 weights) will be redone
    with RunLogger(run_dir, name="sft-seed1", group="g", config={"lr": 1.0}, resume_step=2) as lg:
        assert (run_dir / "wandb_run_id.txt").read_text().strip() == rid
        lg.log({"loss": 30.0}, step=3)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["kind"], r["step"], r.get("loss")) for r in rows] == [
        ("train", 0, 0.0),
        ("train", 1, 1.0),
        ("train", 2, 2.0),
        ("train", 3, 30.0),
    ]
    run_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all((d / f"run-{rid}.wandb").exists() for d in run_dirs)
    # fresh start: new W&B id, empty metrics
    with RunLogger(run_dir, name="sft-seed1", wandb_mode="disabled", fresh=True) as lg:
        assert read_metrics(run_dir / "metrics.jsonl") == []
    assert not (run_dir / "wandb_run_id.txt").exists()


def test_metrics_file_without_wandb(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, name="x", wandb_mode="disabled") as lg:
        lg.log(
            {
                "loss": torch.tensor(0.5),
                "lr": np.float64(1e-3),
                "n": np.int64(3),
                "ok": True,
                "nan": float("nan"),
                "skip": None,
            },
            step=0,
        )
        with pytest.raises(MathptError, match="'bad'"):
            lg.log({"bad": "text"}, step=1)
        with pytest.raises(MathptError, match="'vec'"):
            lg.log({"vec": torch.ones(3)}, step=1)
        with pytest.raises(MathptError, match="reserved"):
            lg.log({"step": 1}, step=1)
        with pytest.raises(MathptError, match="int"):
            lg.log({"loss": 1.0}, step=1.5)
        lg.truncate_after(-1)
        lg.log({"loss": 0.25}, step=0)  # the handle still appends after a truncation
    assert not (run_dir / "wandb").exists()
    text = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["loss"] == 0.25
    with pytest.raises(MathptError, match="closed"):
        lg.log({"loss": 1.0}, step=2)

    # a row cut by a crash is dropped on reopen (with a warning), the rest is kept
    path = tmp_path / "run2" / "metrics.jsonl"
    with RunLogger(path.parent, name="x", wandb_mode="disabled") as lg:
        lg.log({"loss": 1.0, "lr": np.float32(0.5), "flag": True, "nan": float("inf")}, step=0)
    row = read_metrics(path)[0]
    assert (row["loss"], row["lr"], row["flag"], row["nan"]) == (1.0, 0.5, 1, None)
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')
    assert len(read_metrics(path)) == 1  # readers skip the torn tail too
    with pytest.warns(UserWarning, match="unterminated"):
        lg = RunLogger(path.parent, name="x", wandb_mode="disabled")
    lg.log({"loss": 2.0}, step=1)
    lg.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train", "step": 0}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_metrics(bad)
    with pytest.raises(DataError, match="not found"):
        read_metrics(tmp_path / "missing.jsonl")


def test_wandb_init_failure_keeps_local_metrics(wandb_env, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("service did not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="service did not start"):
        lg = RunLogger(wandb_env / "run", name="grpo_clip-seed0", config={})
    with lg:
        assert lg.wandb_run is None
        lg.log({"loss": 1.0}, step=0)
        lg.log_eval({"accuracy": 0.5}, step=0)
    assert [r["kind"] for r in read_metrics(wandb_env / "run" / "metrics.jsonl")] == ["train", "eval"]
    with pytest.raises(MathptError, match="wandb login"):
        RunLogger(wandb_env / "run_online", name="x", wandb_mode="online")
    with pytest.raises(MathptError, match="wandb mode"):
        RunLogger(wandb_env / "r", name="x", wandb_mode="offlin")


def test_metric_names_are_documented():
    assert "accuracy" in EVAL_METRICS
    assert len(set(TRAIN_METRICS)) == len(TRAIN_METRICS) == 19


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "OPENAI_API_KEY",
        "hf_token",
        "HF_TOKEN",
        "clientSecret",
        "password",
        "db-passwd",
        "apikey",
        "openaiApiKey",
        "authtoken",
        "secret",
        "wandb.key",
        "credentials",
    ],
)
def test_secret_keys_are_masked(key):
    assert is_secret_key(key)
    out = scrub({"a": {key: "value-123"}, "b": [{key: {"nested": 1}}]})
    assert out == {"a": {key: MASK}, "b": [{key: MASK}]}


@pytest.mark.parametrize(
    "key",
    [
        "max_tokens",
        "max_new_tokens",
        "tokenizer",
        "eos_token_id",
        "api_key_env",
        "keyword",
        "secret_name_env",
        "num_tokens",
        "monkey_business",
        "lr",
    ],
)
def test_lookalike_keys_are_kept(key):
    assert not is_secret_key(key)
    cfg = {key: "some-value", "n": 3}
    assert scrub(cfg) == cfg


def test_scrub_copies_and_masks_token_shaped_values():
    cfg = {
        "teacher": {"api_key": "abc-secret", "model": "gpt"},
        "url": "x?hf_abcdefghijklmnopqrstuvw",
        "headers": ["Bearer abcdefghijklmnopqrstuvwxyz"],
        "token": None,
        "empty_key": "",
        "t": ("sk-proj-abcdefghijklmnop1234",),
        "flag_token": True,
    }
    out = scrub(cfg)
    assert out == {
        "teacher": {"api_key": MASK, "model": "gpt"},
        "url": f"x?{MASK}",
        "headers": [MASK],
        "token": None,
        "empty_key": "",
        "t": (MASK,),
        "flag_token": True,
    }
    assert cfg["teacher"]["api_key"] == "abc-secret"  # input untouched


def test_redact_and_secret_values():
    env = {"OPENAI_API_KEY": "envkey-123456", "HOME": "/root", "HF_TOKEN": "abc"}  # "abc" too short
    cfg = {"teacher": {"api_key": "cfg-key-987654", "model": "m"}, "pw": {"password": 12345678}}
    secrets = secret_values(cfg, environ=env)
    assert set(secrets) == {"envkey-123456", "cfg-key-987654", "12345678"}
    text = "failed with key envkey-123456 and cfg-key-987654 (hf_abcdefghijklmnopqrstuvwx) at /root"
    assert redact(text, secrets) == f"failed with key {MASK} and {MASK} ({MASK}) at /root"
    # a secret containing another is removed whole
    assert redact("token=longsecret-abcdef", ["secret-abcdef", "longsecret-abcdef"]) == f"token={MASK}"
