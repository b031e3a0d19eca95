"""End-to-end: the whole DAG on a micro config in a temporary copy of the workflow, then the
rerun rules that users rely on (params triggers), checked with dry runs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_PARTS = ["Snakefile", "rules", "scripts", "config", "report", "profiles", "envs"]


def micro_config() -> dict:
    """The micro pipeline config (tests/assets/micro.yaml): generated arith data, so it runs anywhere."""
    return yaml.safe_load((REPO / "tests" / "assets" / "micro.yaml").read_text())


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", "micro.yaml"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=1800)
    if check and proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{p.read_text()[-3000:]}" for p in (workdir / "results" / "logs").rglob("*.log")
        )
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}\n{logs}"
        )
    return proc


def scheduled_jobs(workdir: Path, config_file: str = "micro.yaml") -> list[str]:
    """Jobs a dry run would execute, as 'rule' or 'rule[wildcards]' strings."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", config_file],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs, current = [], None
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            if current:
                jobs.append(current)
            current = m.group(1)
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and current:
            current += f"[{m.group(1)}]"
    if current:
        jobs.append(current)
    return sorted(jobs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / part)
    cfg = micro_config()
    (work / "micro.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(work, "all")
    return work


@pytest.mark.slow
def test_pipeline_produces_ci_table(finished_run):
    table = list(csv.DictReader(open(finished_run / "results" / "ci_table.csv")))
    pairs = {(r["model_a"], r["model_b"]) for r in table}
    # every trained model vs base, every PG variant vs SFT, the PG variants pairwise
    for algo in ("sft", "no_baseline", "reinforce_with_baseline", "grpo_clip"):
        assert any(
            b.startswith(algo) and a == "base" or a.startswith(algo) and b == "base" for a, b in pairs
        ), algo
    for r in table:
        assert int(r["n"]) == 24
        lo, hi, diff = float(r["ci_low"]), float(r["ci_high"]), float(r["diff"])
        assert lo <= diff <= hi
        assert r["benchmark"] == "arith" and r["k_shot"] == "0"  # primary eval: the trained prompt, 0-shot
    for model in ("base", "sft-seed0", "grpo_clip-seed0"):
        rows = [json.loads(x) for x in open(finished_run / "results" / "eval" / model / "gsm8k.jsonl")]
        assert [r["index"] for r in rows] == list(range(24))
    ckpt = finished_run / "results" / "checkpoints" / "grpo_clip-seed0"
    assert (ckpt / "config.json").exists() and (ckpt / "provenance.json").exists()
    assert any(ckpt.glob("*.safetensors"))
    metrics = [
        json.loads(x) for x in open(finished_run / "results" / "runs" / "grpo_clip-seed0" / "metrics.jsonl")
    ]
    assert any(m.get("kind") == "eval" for m in metrics)
    assert (finished_run / "results" / "plots" / "forest.png").stat().st_size > 1000
    manifest = json.loads((finished_run / "results" / "data" / "manifest.json").read_text())
    assert manifest["source"]["name"] == "arith" and manifest["counts"]["test"] == 24


@pytest.mark.slow
def test_job_logs_hold_their_child_processes_output(finished_run):
    """Eval shards and the inference worker are child processes: their output is in the job's log."""
    logs = finished_run / "results" / "logs"
    for model in ("base", "sft-seed0", "grpo_clip-seed0"):
        text = (logs / "eval" / f"{model}-gsm8k.log").read_text()
        assert "gsm8k eval (cpu, pid" in text, text[-2000:]  # the shard process's progress bar
        assert (logs / "eval" / f"{model}-lm_eval.log").stat().st_size > 0
    train = (logs / "train" / "grpo_clip-seed0.log").read_text()
    assert "cpu threads: trainer 1, inference worker 1 (of 2)" in train


@pytest.mark.slow
def test_nothing_to_do_after_run_and_key_reordering(finished_run):
    assert scheduled_jobs(finished_run) == []
    original = (finished_run / "micro.yaml").read_text()
    cfg = yaml.safe_load(original)
    reordered = {k: cfg[k] for k in reversed(list(cfg))}
    reordered["train"] = {k: cfg["train"][k] for k in reversed(list(cfg["train"]))}
    # the same file, its keys reordered (the summary names its config files, so a renamed file
    # legitimately rewrites it)
    (finished_run / "micro.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    try:
        assert scheduled_jobs(finished_run, "micro.yaml") == []
    finally:
        (finished_run / "micro.yaml").write_text(original)


@pytest.mark.slow
def test_grpo_change_reruns_only_grpo(finished_run):
    cfg = yaml.safe_load((finished_run / "micro.yaml").read_text())
    cfg["train"]["grpo_clip"]["cliprange"] = 0.3
    (finished_run / "grpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = scheduled_jobs(finished_run, "grpo.yaml")
    assert "train[algo=grpo_clip, seed=0]" in jobs
    assert "eval_gsm8k[model=grpo_clip-seed0]" in jobs and "ci_table" in jobs
    assert not any(j.startswith(("train[algo=sft", "train[algo=no_", "train[algo=reinforce")) for j in jobs)
    assert not any(j.startswith(("data", "base_model", "traces", "tokenize")) for j in jobs)
    assert not any(j.startswith("eval_gsm8k[model=") and "grpo_clip" not in j for j in jobs)


@pytest.mark.slow
def test_eval_k_change_reruns_evals_not_training(finished_run):
    cfg = yaml.safe_load((finished_run / "micro.yaml").read_text())
    cfg["eval"]["gsm8k"]["k_shot"] = 2
    (finished_run / "k.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = scheduled_jobs(finished_run, "k.yaml")
    evals = [j for j in jobs if j.startswith("eval_gsm8k")]
    assert len(evals) == 5 and "ci_table" in jobs
    assert not any(j.startswith(("train", "data", "tokenize", "traces", "base_model")) for j in jobs)


def test_bad_config_fails_with_key_path(tmp_path):
    from mathpt.config import ConfigError, validate_config

    cfg = micro_config()
    cfg["train"]["pg"]["lr"] = -1
    cfg["eval"]["gsm8k"]["bogus"] = 3
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "train.pg.lr" in str(e.value) and "bogus" in str(e.value)


@pytest.mark.slow
def test_report_builds(finished_run):
    snakemake(finished_run, "--report", "results/report.html")
    html = (finished_run / "results" / "report.html").read_text(errors="replace")
    assert "ci_table.csv" in html and "forest.png" in html and "reward_val.png" in html


@pytest.mark.slow
def test_killed_training_resumes_from_saved_state(finished_run):
    """SIGKILL a PG training job once it has saved state; the rerun resumes instead of restarting."""
    import signal
    import time

    target = "results/checkpoints/grpo_clip-seed0"
    state = finished_run / "results" / "state" / "grpo_clip-seed0" / "state.json"
    cmd = [sys.executable, "-m", "snakemake", target, "--force", "--cores", "2", "--configfile", "micro.yaml"]
    proc = subprocess.Popen(
        cmd,
        cwd=finished_run,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), "the training job never saved resumable state"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["step"] == 1
    snakemake(finished_run, "--unlock")  # a killed Snakemake leaves its lock behind
    snakemake(finished_run, target, "--rerun-incomplete")
    log = (finished_run / "results" / "logs" / "train" / "grpo_clip-seed0.log").read_text()
    assert "resuming from" in log and "at step 1" in log
    assert not state.exists()  # cleared once the run finished
    steps = [
        json.loads(x)["step"]
        for x in open(finished_run / "results" / "runs" / "grpo_clip-seed0" / "metrics.jsonl")
        if json.loads(x)["kind"] == "train"
    ]
    # Step 1 is not trained again. (Snakemake deletes an incomplete job's declared outputs, so the
    # rerun's metrics.jsonl starts at the resumed step; the W&B run beside it keeps the history.)
    assert steps == [2]


_JOB = r"""
import multiprocessing as mp, subprocess, sys, types
from mathpt.io import MathptError
from mathpt.pipeline import run_script


def child():
    print("spawned child on stdout", flush=True)
    print("spawned child on stderr", file=sys.stderr, flush=True)


def main(smk, cfg):
    import logging
    logging.getLogger("mathpt").info("job info line, slice %s", cfg)
    print("job print", flush=True)
    subprocess.run([sys.executable, "-c", "import sys; print('subprocess out'); print('subprocess err', file=sys.stderr)"],
                   check=True)
    p = mp.get_context("spawn").Process(target=child)
    p.start(); p.join()
    if cfg["fail"]:
        raise MathptError("bad row 7 in x.jsonl")


if __name__ == "__main__":
    smk = types.SimpleNamespace(log=[sys.argv[1]], params=types.SimpleNamespace(cfg=sys.argv[2]), rule="demo",
                                resources=types.SimpleNamespace(gpu=0))
    run_script(smk, main)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_job_log_holds_child_process_output(tmp_path, fail):
    """Everything a job's processes print goes to its log file; the console gets only the error line."""
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    log = tmp_path / "logs" / "demo.log"
    log.parent.mkdir()
    log.write_text("stale text from an earlier run\n")
    proc = subprocess.run(
        [sys.executable, str(script), str(log), json.dumps({"fail": fail})],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    text = log.read_text()
    for line in (
        "job info line",
        "job print",
        "subprocess out",
        "subprocess err",
        "spawned child on stdout",
        "spawned child on stderr",
    ):
        assert line in text, (line, text)
    assert "stale text" not in text
    assert "job info line" not in proc.stdout + proc.stderr and "subprocess out" not in proc.stdout
    if fail:
        assert proc.returncode == 1
        assert "mathpt error in rule demo: bad row 7 in x.jsonl" in proc.stderr
        assert proc.stderr.count("bad row 7") == 1 and "bad row 7" in text
    else:
        assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("n, want", [(1, (1, 1)), (2, (1, 1)), (3, (2, 1)), (8, (4, 4))])
def test_split_cores(n, want):
    from mathpt.runtime.worker import split_cores

    assert split_cores(n) == want


def test_worker_takes_its_share_of_the_cores(monkeypatch):
    import torch

    from mathpt.runtime import worker

    before = torch.get_num_threads()
    assert worker.apply_thread_share(None) is None  # no share handed over: the worker keeps its threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # recorded, so the value set below is undone
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    try:
        assert worker.apply_thread_share(1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == str(max(os.sched_getaffinity(0)))
    finally:
        torch.set_num_threads(before)
