"""Same config, same seed, same machine: two runs of the micro DAG give identical traces, shards,
checkpoints (tensor-equal) and eval rows.

What may differ across machines or thread counts (and is therefore not asserted here): float
reductions in torch's CPU kernels are split by thread count and vectorized by ISA (AVX2 vs
AVX-512 vs NEON), so logits can differ in the last bits; greedy decoding and sampling then
diverge wherever two tokens are nearly tied. docs/design.md ("Determinism") has the details.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_pipeline import REPO, WORKFLOW_PARTS, micro_config, snakemake

TARGETS = ["results/eval/grpo_clip-seed0/gsm8k.jsonl", "results/eval/sft-seed0/gsm8k.jsonl"]


def _run(root: Path) -> Path:
    root.mkdir(parents=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / part)
    cfg = micro_config()
    cfg["train"]["algorithms"] = ["sft", "grpo_clip"]
    (root / "micro.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(root, *TARGETS)
    return root / "results"


def _rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def _tensors(directory: Path) -> dict[str, dict]:
    return {
        p.relative_to(directory).as_posix(): load_file(p) for p in sorted(directory.rglob("*.safetensors"))
    }


def _assert_tensors_equal(a: dict[str, dict], b: dict[str, dict], what: str) -> None:
    assert a.keys() == b.keys() and a, f"{what}: different or no safetensors files"
    for name in a:
        assert a[name].keys() == b[name].keys(), f"{what}/{name}: different tensor names"
        for key in a[name]:
            assert a[name][key].equal(b[name][key]), f"{what}/{name}: tensor {key} differs"


@pytest.mark.slow
def test_two_runs_of_the_micro_config_are_identical(tmp_path):
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert _rows(first / "traces" / "traces.jsonl") == _rows(second / "traces" / "traces.jsonl")
    _assert_tensors_equal(_tensors(first / "tokenized"), _tensors(second / "tokenized"), "tokenized")
    for run in ("sft-seed0", "grpo_clip-seed0"):
        _assert_tensors_equal(
            _tensors(first / "checkpoints" / run), _tensors(second / "checkpoints" / run), run
        )
        # the PG run's logged rewards come from the same rollouts (timings are not compared). Rows are
        # compared as sets: a validation row is logged when its result arrives from the worker, so
        # whether it lands just before or just after a train row is timing, like the `time` column.
        keys = ("step", "kind", "loss", "reward_mean", "format_reward", "grad_norm")
        a = [{k: r.get(k) for k in keys} for r in _rows(first / "runs" / run / "metrics.jsonl")]
        b = [{k: r.get(k) for k in keys} for r in _rows(second / "runs" / run / "metrics.jsonl")]
        assert sorted(a, key=_key) == sorted(b, key=_key), f"{run}: logged metrics differ"
    for model in ("sft-seed0", "grpo_clip-seed0"):
        rows = _rows(first / "eval" / model / "gsm8k.jsonl")
        assert rows and rows == _rows(second / "eval" / model / "gsm8k.jsonl"), f"{model}: eval rows differ"
