"""The report figures are valid PNGs built from the tables (also when read back from CSV)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mathpt import ci_table, plots
from mathpt.io import MathptError

META = {
    "benchmark": "gsm8k",
    "split": "test",
    "scorer": "math-verify",
    "k_shot": 4,
    "decoding": "greedy",
    "code_version": "abc",
}


@pytest.fixture
def evals(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for model, acc in {
        "base": 0.2,
        "sft": 0.4,
        "no_baseline": 0.3,
        "reinforce_with_baseline": 0.5,
        "grpo_clip": 0.6,
    }.items():
        for seed in [None] if model == "base" else [0, 1]:
            p = tmp_path / f"{ci_table.model_name(model, seed)}.jsonl"
            rows = []
            for i in range(50):
                right, formatted = bool(rng.random() < acc), bool(rng.random() < 0.8)
                rows.append(
                    {
                        "index": i,
                        "gold": "1",
                        "correct": right and formatted,
                        "formatted": formatted,
                        "correct_any_format": right,
                        "truncated": bool(rng.random() < 0.1),
                        "generated_tokens": 5,
                    }
                )
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
            out.setdefault(model, {})[seed] = str(p)
    return out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert len(data) > 2000
    return struct.unpack(">II", data[16:24])


def test_forest_and_accuracy_png(tmp_path, evals):
    paths = evals
    ci_table.build_ci_table(paths, tmp_path / "ci.csv", META, n_resamples=200)
    ci_table.build_accuracy_table(paths, tmp_path / "acc.csv", META, n_resamples=200)
    ci_rows = ci_table.read_csv(tmp_path / "ci.csv")

    plots.forest_plot(ci_rows, tmp_path / "forest.png")
    w, h = _png_size(tmp_path / "forest.png")
    assert w > 400 and h > 30 * len(ci_rows)  # one readable line per comparison

    plots.accuracy_bars(ci_table.read_csv(tmp_path / "acc.csv"), tmp_path / "fig" / "accuracy.png")
    w, h = _png_size(tmp_path / "fig" / "accuracy.png")
    assert w > 400 and h > 200
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic write left no temp file


def test_plots_reject_empty_rows(tmp_path):
    with pytest.raises(MathptError, match="no rows"):
        plots.forest_plot([], tmp_path / "f.png")
    with pytest.raises(MathptError, match="no rows"):
        plots.accuracy_bars([], tmp_path / "a.png")
    assert not (tmp_path / "f.png").exists()
