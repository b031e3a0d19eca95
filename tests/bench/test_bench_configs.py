"""The GPU benchmarks' settings are valid without a GPU (fast: no model, no run).

The side-by-side's mathpt half once failed on the H100 within 4 s: it put the one_gpu layout over the
two-GPU reference config, whose ``eval.gsm8k.num_shards: 2`` needs two GPUs, and its CPU smoke run
(``--layout cpu``) could not see it. Building the settings the GPU command line builds catches that here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from trl_grpo_side_by_side import mathpt_config, parser  # noqa: E402

from mathpt.config import ConfigError  # noqa: E402
from mathpt.train.settings import PGSettings  # noqa: E402


def test_side_by_side_gpu_command_builds_valid_settings():
    a = parser().parse_args(["--model", "/nonexistent"])  # the printed GPU command's defaults
    cfg = mathpt_config(a)
    assert cfg["runtime"]["layout"] == "one_gpu" and cfg["pg"]["microbatch_tokens"] == a.microbatch_tokens
    s = PGSettings.from_config(cfg)
    assert s.rollout_batch_size == a.prompts * a.group and s.staleness == a.staleness


def test_side_by_side_refuses_a_two_gpu_recipe_on_one_gpu():
    a = parser().parse_args(["--model", "/nonexistent", "--config", "config/qwen2.5-math-1.5b.yaml"])
    with pytest.raises(ConfigError, match="eval.gsm8k.num_shards"):
        mathpt_config(a)
    a.layout = "two_gpu"
    assert mathpt_config(a)["runtime"]["layout"] == "two_gpu"
