"""Every job of a run shares one compile cache, and records its start-up milestones for the summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathpt import summary, timing
from mathpt.pipeline import CACHE_VARS, results_dir, use_shared_compile_cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*CACHE_VARS, "MATHPT_CACHE_DIR", timing.ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_results_dir_is_the_parent_of_the_logs_folder(tmp_path):
    assert results_dir(str(tmp_path / "results" / "logs" / "eval" / "base-gsm8k.log")) == tmp_path / "results"
    assert results_dir(str(tmp_path / "results" / "logs" / "data.log")) == tmp_path / "results"
    assert results_dir(None) == Path("results").absolute()


def test_compile_cache_defaults_to_the_results_tree(clean_env, tmp_path):
    log = tmp_path / "results" / "logs" / "train" / "sft-seed0.log"
    chosen = use_shared_compile_cache(str(log))
    cache = tmp_path / "results" / ".cache"
    expected = {
        "VLLM_CACHE_ROOT": "vllm",
        "TORCHINDUCTOR_CACHE_DIR": "inductor",
        "TRITON_CACHE_DIR": "triton",
    }
    assert chosen == {var: str(cache / sub) for var, sub in expected.items()}
    assert all(os.environ[var] == path for var, path in chosen.items())


def test_compile_cache_override_and_user_settings_win(clean_env, tmp_path):
    clean_env.setenv("MATHPT_CACHE_DIR", str(tmp_path / "shared"))
    clean_env.setenv("TRITON_CACHE_DIR", "/my/triton")
    chosen = use_shared_compile_cache(str(tmp_path / "results" / "logs" / "x.log"))
    assert chosen == {
        "VLLM_CACHE_ROOT": str(tmp_path / "shared" / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "shared" / "inductor"),
    }
    assert os.environ["TRITON_CACHE_DIR"] == "/my/triton"


def test_timing_path_names_the_job_after_its_log(tmp_path):
    logs = tmp_path / "results" / "logs"
    assert timing.timing_path(logs / "eval" / "base-gsm8k.log") == (
        "eval/base-gsm8k",
        logs / "timing" / "eval" / "base-gsm8k.json",
    )
    assert timing.timing_path(tmp_path / "job.log") == ("job", tmp_path / "timing" / "job.json")


def test_read_events_keeps_each_first_time_and_skips_garbage(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"event": "start", "t": 100.0, "pid": 1}),
                json.dumps({"event": "imports", "t": 110.5, "pid": 2}),
                "not json",
                json.dumps({"event": "imports", "t": 109.0, "pid": 3}),
                json.dumps({"t": 5}),
                json.dumps({"event": "end", "t": 130.0, "pid": 1}),
            ]
        )
    )
    events = timing.read_events(f)
    assert events == {"start": 100.0, "imports": 109.0, "end": 130.0}
    rec = timing.job_timing("demo", events)
    assert rec["since_start_s"] == {"start": 0.0, "imports": 9.0, "end": 30.0}


_JOB = r"""
import multiprocessing as mp, os, sys, time, types
from mathpt import timing
from mathpt.pipeline import run_script


def child(out):
    with open(out, "w") as f:
        f.write(os.environ["VLLM_CACHE_ROOT"])
    timing.mark("engine_ready")
    time.sleep(0.05)
    timing.mark("first_output")


def main(smk, cfg):
    timing.mark("imports")
    timing.mark("imports")  # a second mark of the same event in one process is ignored
    p = mp.get_context("spawn").Process(target=child, args=(sys.argv[2],))
    p.start(); p.join()


if __name__ == "__main__":
    smk = types.SimpleNamespace(log=[sys.argv[1]], params=types.SimpleNamespace(cfg="{}"), rule="demo",
                                resources=types.SimpleNamespace(gpu=0))
    run_script(smk, main)
"""


def test_job_records_its_milestones_and_its_children_share_the_cache(clean_env, tmp_path):
    """Through run_script as a rule runs it: the spawned child inherits the cache and the timing file."""
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    log = tmp_path / "results" / "logs" / "eval" / "demo.log"
    log.parent.mkdir(parents=True)
    child_saw = tmp_path / "child_cache.txt"
    env = {k: v for k, v in os.environ.items() if k not in (*CACHE_VARS, "MATHPT_CACHE_DIR", timing.ENV)}
    proc = subprocess.run(
        [sys.executable, str(script), str(log), str(child_saw)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + log.read_text()
    assert child_saw.read_text() == str(tmp_path / "results" / ".cache" / "vllm")
    rec = json.loads((tmp_path / "results" / "logs" / "timing" / "eval" / "demo.json").read_text())
    since = rec["since_start_s"]
    assert rec["job"] == "eval/demo"
    assert set(since) == {"start", "imports", "engine_ready", "first_output", "end"}
    assert (
        since["start"]
        == 0
        < since["imports"]
        <= since["engine_ready"]
        < since["first_output"]
        <= since["end"]
    )
    assert "timing of eval/demo since process start" in log.read_text()


def test_summary_prints_the_startup_table_when_records_exist(tmp_path):
    d = tmp_path / "timing"
    (d / "eval").mkdir(parents=True)
    rec = timing.job_timing(
        "eval/base-gsm8k", {"start": 0.0, "imports": 20.0, "engine_ready": 45.5, "end": 60.0}
    )
    (d / "eval" / "base-gsm8k.json").write_text(json.dumps(rec))
    (d / "broken.json").write_text("{")
    records = timing.read_timings(d)
    assert [r["job"] for r in records] == ["eval/base-gsm8k"]
    lines = summary.startup_section(records)
    assert lines[0].startswith("## Job start-up")
    assert "| `eval/base-gsm8k` | 20.0 | 45.5 | – | – | 60.0 |" in lines
    assert summary.startup_section(timing.read_timings(tmp_path / "absent")) == []


def test_engine_marks_imports_ready_and_first_output_in_order(clean_env, tmp_path, tiny_model_dir):
    """Through make_engine and generate, as the eval shards and the inference worker call them."""
    from mathpt.engines import make_engine
    from mathpt.engines.base import SamplingConfig

    events = tmp_path / "events.jsonl"
    clean_env.setenv(timing.ENV, str(events))
    timing.reset()
    engine = make_engine("hf", str(tiny_model_dir), device="cpu")
    assert "first_output" not in timing.read_events(events)
    engine.generate(["1 + 1 ="], SamplingConfig(max_new_tokens=2, temperature=0.0, logprobs=False))
    engine.generate(["2 + 2 ="], SamplingConfig(max_new_tokens=2, temperature=0.0, logprobs=False))
    got = timing.read_events(events)
    assert got["imports"] <= got["engine_ready"] <= got["first_output"]
    assert len(events.read_text().splitlines()) == 3  # marked once per process, not per call
    timing.reset()
