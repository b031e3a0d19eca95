"""mathpt.outputs: the lines `make run` prints at the end."""

from __future__ import annotations

import csv
import random

import pytest

from mathpt.outputs import summary, table_lines


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=["model_a", "model_b", "seed", "diff", "ci_low", "ci_high", "holm_p"]
        )
        w.writeheader()
        w.writerows(rows)


def test_table_lines_show_each_comparison_with_its_interval(tmp_path):
    rng = random.Random(0)
    rows = []
    for a, b, seed in [
        ("sft-seed0", "base", "0"),
        ("grpo_clip", "sft", "pooled"),
        ("grpo_clip-seed1", "sft-seed1", "1"),
    ]:
        lo = rng.uniform(-0.1, 0.3)
        rows.append(
            {
                "model_a": a,
                "model_b": b,
                "seed": seed,
                "diff": lo + 0.05,
                "ci_low": lo,
                "ci_high": lo + 0.1,
                "holm_p": rng.random(),
            }
        )
    _write(tmp_path / "ci_table.csv", rows)
    lines = table_lines(tmp_path / "ci_table.csv")
    assert len(lines) == 1 + len(rows)
    assert "GRPO-clip  -  SFT" in lines[1]  # pooled rows first, with the registry's labels
    by_name = {"SFT (seed 0)  -  base": rows[0], "GRPO-clip (seed 1)  -  SFT (seed 1)": rows[2]}
    for name, r in by_name.items():
        line = next(x for x in lines if name in x)
        assert f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" in line and f"{r['diff']:+.3f}" in line
    assert len(table_lines(tmp_path / "ci_table.csv", limit=1)) == 3  # header, one row, "... 2 more rows"


def test_tiny_p_values_keep_their_exponent(tmp_path):
    row = {"model_a": "sft-seed0", "model_b": "base", "seed": "0", "diff": 0.3, "ci_low": 0.2, "ci_high": 0.4}
    _write(tmp_path / "ci_table.csv", [{**row, "holm_p": 3.637978807091713e-12}, {**row, "holm_p": 0.0098}])
    lines = table_lines(tmp_path / "ci_table.csv")
    assert lines[1].endswith("3.6e-12") and lines[2].endswith("0.0098")


def test_summary_lists_only_what_exists(tmp_path):
    (tmp_path / "plots").mkdir()
    text = summary(tmp_path)
    assert "plots" in text and "HTML report" not in text and "ci_table.csv" not in text


def test_one_seed_tables_are_flagged_as_not_findings(tmp_path):
    from mathpt.outputs import ONE_SEED

    row = {"model_a": "grpo_clip-seed0", "model_b": "sft-seed0", "diff": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    _write(tmp_path / "ci_table.csv", [{**row, "seed": "0", "holm_p": 0.01}])
    text = summary(tmp_path)
    assert ONE_SEED in text and text.index(ONE_SEED) < text.index("GRPO-clip (seed 0)")
    _write(tmp_path / "ci_table.csv", [{**row, "seed": "0", "holm_p": 0.01}, {**row, "seed": "pooled"}])
    assert ONE_SEED not in summary(tmp_path)


@pytest.mark.slow
def test_make_dag_works_in_a_fresh_copy(tmp_path):
    """`make dag` on a fresh clone: no results/ yet, no --cores given by the user; the SVG only with dot."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    for part in ["Snakefile", "Makefile", "rules", "scripts", "config", "report", "profiles", "envs"]:
        src = repo / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    venv = Path(sys.executable).parent.parent
    # -o: the venv exists already (make test made it); do not rebuild it from this copy's files
    proc = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "dag", f"VENV={venv}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "flowchart" in (tmp_path / "results" / "rulegraph.mmd").read_text()
    dot = (tmp_path / "results" / "dag.dot").read_text()
    assert "digraph" in dot and "train" in dot
    if shutil.which("dot"):
        assert (tmp_path / "results" / "dag.svg").read_text().lstrip().startswith("<?xml")
    else:
        assert "apt-get install graphviz" in proc.stdout
