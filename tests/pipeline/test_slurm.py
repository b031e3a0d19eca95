"""The micro DAG through a real SLURM cluster with profiles/slurm (snakemake-executor-plugin-slurm).

Needs a running cluster: CI starts a one-node one with ``bash .ci/slurm.sh`` (as root); elsewhere
these tests skip with the reason. Every job must go through sbatch: its SLURM job id is in
Snakemake's log, its SLURM log file is kept, and slurmctld still knows it as COMPLETED.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import REPO, WORKFLOW_PARTS, micro_config

TIMEOUT_S = 600  # the whole run; `timeout -k` so Snakemake can never hang the suite


def _cluster_state() -> str | None:
    """None when a node can take jobs, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return (
            "no SLURM client (sinfo/sbatch) on PATH; start a one-node cluster with `bash .ci/slurm.sh` (root)"
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s: slurmctld is down (`bash .ci/slurm.sh` starts it)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"SLURM cluster is down (sinfo: {(out.stdout + out.stderr).strip()[:200]!r}); `bash .ci/slurm.sh` starts it"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_cluster_state() is not None, reason=str(_cluster_state())),
]


def _workflow(tmp_path: Path, cfg: dict) -> Path:
    work = tmp_path / "workflow"
    work.mkdir()
    for part in dict.fromkeys([*WORKFLOW_PARTS, "envs"]):  # rules name their conda env file
        src = REPO / part
        if not src.exists():
            continue
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / part)
    (work / "micro.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work


def _snakemake_slurm(
    work: Path, *args: str, env: dict | None = None, set_resources: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Snakemake with the SLURM profile, sized for a 2-CPU test node (the profile's defaults are for
    the reference config: 8 CPUs, 64 GB for a training job). Only set-resources is overridden (one
    --set-resources replaces the profile's whole block, so extra entries come in ``set_resources``);
    a --default-resources here would drop the profile's partition and account too."""
    small = [
        f"{rule}:{res}"
        for rule in ("train", "eval_gsm8k", "eval_lm", "traces")
        for res in ("mem_mb=2500", "runtime=20")
    ]
    snakemake = [sys.executable, "-m", "snakemake", *args, "--workflow-profile", "profiles/slurm"]
    options = "--configfile micro.yaml --cores 1 --slurm-init-seconds-before-status-checks 5 --latency-wait 5"
    # --cores 1: one CPU per job, so two jobs share the 2-CPU node; status checks every 5 s
    # (3 x 5 s <= MinJobAge 300 s keeps squeue in use)
    cmd = [
        "timeout",
        "-k",
        "20",
        str(TIMEOUT_S),
        *snakemake,
        *options.split(),
        "--set-resources",
        *small,
        *set_resources,
    ]
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=full_env, timeout=TIMEOUT_S + 60)


def _report(work: Path, proc: subprocess.CompletedProcess) -> str:
    logs = "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    )
    return f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n{logs}"


def test_micro_dag_runs_through_slurm(tmp_path):
    cfg = micro_config()
    cfg["train"]["algorithms"] = ["sft"]  # every kind of rule up to the table, in 8 jobs (a PG run adds 2)
    work = _workflow(tmp_path, cfg)
    proc = _snakemake_slurm(work, "results/ci_table.csv")
    assert proc.returncode == 0, _report(work, proc)

    table = list(csv.DictReader(open(work / "results" / "ci_table.csv")))
    # one row, SFT vs base (the table names models by their label)
    assert len(table) == 1 and {table[0]["model_a"], table[0]["model_b"]} == {"base", "sft"}, table
    assert all(int(r["n"]) == 24 for r in table)

    expected = {"data", "base_model", "traces", "tokenize", "train", "eval_gsm8k", "ci_table"}
    n_jobs = 1 + 1 + 1 + 1 + 1 + 2 + 1  # data, base_model, traces, tokenize, train, 2 evals, ci_table
    ids = re.findall(r"submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr)
    assert len(ids) == len(set(ids)) == n_jobs, _report(work, proc)
    slurm_logs = list((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in slurm_logs} == set(ids)
    assert {p.relative_to(work / ".snakemake" / "slurm_logs").parts[0] for p in slurm_logs} == {
        f"rule_{r}" for r in expected
    }
    for log in slurm_logs:  # written by slurmd (sbatch --output): the job step ran the rule there
        rule = log.relative_to(work / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        assert f"(Rule: {rule})" in log.read_text(), log
    # slurmctld forgets finished jobs MinJobAge (300 s) after they end: the last ones are still known
    states = {}
    for jid in ids:
        out = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=15)
        if out.returncode == 0:
            states[jid] = re.search(r"JobState=(\w+)", out.stdout).group(1)
    assert ids[-1] in states and set(states.values()) == {"COMPLETED"}, states


def test_unknown_partition_ends_the_run_with_the_scheduler_message(tmp_path):
    work = _workflow(tmp_path, micro_config())
    proc = _snakemake_slurm(
        work, "results/data/manifest.json", env={"MATHPT_SLURM_PARTITION": "no_such_partition"}
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), _report(work, proc)  # failed, and did not hang
    assert "Error in rule data" in out and "invalid partition specified: no_such_partition" in out, _report(
        work, proc
    )
    assert not (work / "results" / "data" / "manifest.json").exists()


def test_gpu_job_on_a_cluster_without_gpus_ends_the_run(tmp_path):
    """A rule asking for a GPU (gpu=1 -> --gpus=1) where no node has one: sbatch refuses it at once."""
    work = _workflow(tmp_path, micro_config())
    proc = _snakemake_slurm(work, "results/data/manifest.json", set_resources=("data:gpu=1",))
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), _report(work, proc)
    assert "Error in rule data" in out and "Invalid generic resource (gres) specification" in out, _report(
        work, proc
    )
