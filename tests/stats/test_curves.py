"""Training curves from metrics.jsonl files, and the Snakemake report built with our captions."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mathpt.algorithms import ALGOS  # noqa: E402
from mathpt.algorithms import parse_model_name as parse_run_name
from mathpt.curves import make_figures, plot_training_curves, series  # noqa: E402
from mathpt.io import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, algo: str, seed: int, steps: int = 12, eval_every: int = 3) -> dict:
    """A fake run's metrics.jsonl (SFT without rewards or lengths); returns what was written."""
    rng = np.random.default_rng(seed * 10 + len(algo))
    rows, expect = [], {"reward_mean": {}, "accuracy": {}, "loss": {}}
    for step in range(steps):
        row = {
            "kind": "train",
            "step": step,
            "time": 0.0,
            "loss": float(rng.normal()),
            "entropy": float(rng.uniform(0, 3)),
        }
        if algo != "sft":
            row |= {
                "reward_mean": float(rng.uniform()),
                "response_length_mean": float(rng.uniform(5, 50)),
                "response_length_max": int(rng.integers(50, 100)),
            }
            expect["reward_mean"][step] = row["reward_mean"]
        expect["loss"][step] = row["loss"]
        rows.append(row)
        if step % eval_every == eval_every - 1 and step >= eval_every:  # evals arrive one interval late
            acc = float(rng.uniform())
            rows.append({"kind": "eval", "step": step - eval_every, "accuracy": acc})
            expect["accuracy"][step - eval_every] = acc
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expect


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def has_no_data(ax) -> bool:
    return any(t.get_text() == "no data" for t in ax.texts)


def test_parse_run_name():
    assert parse_run_name("grpo_clip-seed12") == ("grpo_clip", 12)
    assert parse_run_name("reinforce_with_baseline-seed0") == ("reinforce_with_baseline", 0)
    assert parse_run_name("base") == ("base", None)


def test_series_sorts_dedups_and_skips_missing():
    rng = np.random.default_rng(1)
    steps = rng.permutation(20).tolist() + [3, 7]  # steps 3 and 7 logged again after a resume
    rows = [{"kind": "train", "step": s, "loss": float(rng.normal())} for s in steps]
    rows[5]["loss"] = None
    rows.append({"kind": "eval", "step": 99, "loss": 1.0})
    expect = {}
    for r in rows:  # independent reference: last non-null train value per step
        if r["kind"] == "train" and r["loss"] is not None:
            expect[r["step"]] = r["loss"]
    xs, ys = series(rows, "train", "loss")
    assert xs == sorted(expect) and ys == [expect[s] for s in sorted(expect)]


def test_figures_show_every_run(tmp_path):
    files, expect = {}, {}
    for algo in ALGOS:
        for seed in (0, 1):
            name = f"{algo}-seed{seed}"
            files[name] = tmp_path / name / "metrics.jsonl"
            expect[name] = write_metrics(files[name], algo, seed)
    data = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in files.items()}
    figs = make_figures(data)
    try:
        reward_ax, val_ax = figs["reward_val"].axes
        rewards = lines_by_label(reward_ax)
        assert set(rewards) == {n for n in files if not n.startswith("sft")}  # SFT has no reward
        for name, (xs, ys) in rewards.items():
            assert xs == sorted(expect[name]["reward_mean"])
            assert ys == [expect[name]["reward_mean"][s] for s in xs]
        vals = lines_by_label(val_ax)
        assert set(vals) == set(files)
        for name, (xs, ys) in vals.items():  # drawn at the evaluated step, not the arrival step
            assert xs == sorted(expect[name]["accuracy"]) == [2, 5, 8]
            assert ys == [expect[name]["accuracy"][s] for s in xs]
        # seeds of one algorithm share a colour, algorithms differ
        colour = {n: ln.get_color() for ln in val_ax.get_lines() for n in [ln.get_label()]}
        assert colour["grpo_clip-seed0"] == colour["grpo_clip-seed1"] != colour["sft-seed0"]

        le_axes = figs["loss_entropy"].axes
        assert len(le_axes) == 2 * len(ALGOS)
        for ax in le_axes:
            runs = lines_by_label(ax)
            assert len(runs) == 2 and len({parse_run_name(r)[0] for r in runs}) == 1
            if "loss" in ax.get_title():
                for name, (xs, ys) in runs.items():
                    assert ys == [expect[name]["loss"][s] for s in xs]

        (len_ax,) = figs["response_length"].axes
        labels = set(lines_by_label(len_ax))
        assert {n for n in files if not n.startswith("sft")} <= labels
        assert {f"_{n} max" for n in files if not n.startswith("sft")} <= labels  # thin max lines
        assert not any(lab.lstrip("_").startswith("sft") for lab in labels)
    finally:
        for f in figs.values():
            plt.close(f)


def test_plot_files_and_no_data(tmp_path):
    write_metrics(tmp_path / "a" / "metrics.jsonl", "grpo_clip", 0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    paths = plot_training_curves({"grpo_clip-seed0": tmp_path / "a" / "metrics.jsonl"}, tmp_path / "plots")
    assert set(paths) == {"reward_val", "loss_entropy", "response_length"}
    for p in paths.values():
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths.values())

    # empty file and keys that are missing: every panel says "no data", nothing crashes
    paths = plot_training_curves({"sft-seed0": tmp_path / "b" / "metrics.jsonl"}, tmp_path / "empty")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths.values())
    figs = make_figures({"sft-seed0": [], "grpo_clip-seed0": [{"kind": "train", "step": 0, "other": 1}]})
    try:
        assert all(has_no_data(ax) for f in figs.values() for ax in f.axes)
    finally:
        for f in figs.values():
            plt.close(f)
    figs = make_figures({})
    try:
        assert all(has_no_data(ax) for f in figs.values() for ax in f.axes)
    finally:
        for f in figs.values():
            plt.close(f)

    with pytest.raises(DataError, match="missing.jsonl"):
        plot_training_curves({"x-seed0": tmp_path / "missing.jsonl"}, tmp_path / "out")


def _visible_text(s: str) -> str:
    """Text of rst or report HTML with markup dropped and whitespace collapsed, for comparisons."""
    s = s.replace("\\n", " ").replace('\\"', '"')
    s = re.sub(r"<[^>]+>", " ", html.unescape(s))
    s = re.sub(r"[`*]", "", s)
    return re.sub(r"\s+", " ", s).strip()


@pytest.mark.slow
def test_snakemake_report_builds_with_captions(tmp_path):
    shutil.copytree(REPO / "report", tmp_path / "report")
    write_metrics(tmp_path / "metrics" / "grpo_clip-seed0.jsonl", "grpo_clip", 0)
    write_metrics(tmp_path / "metrics" / "sft-seed0.jsonl", "sft", 0)
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        report: "report/workflow.rst"
        FIGS = ["reward_val", "loss_entropy", "response_length"]

        rule all:
            input: expand("plots/{{fig}}.png", fig=FIGS), "plots/forest.png", "plots/accuracy.png"

        rule curves:
            input: grpo="metrics/grpo_clip-seed0.jsonl", sft="metrics/sft-seed0.jsonl"
            output:
                **{{f: report(f"plots/{{f}}.png", caption=f"report/curves_{{f}}.rst", category="Training curves")
                   for f in FIGS}}
            run:
                from mathpt.curves import plot_training_curves
                plot_training_curves({{"grpo_clip-seed0": input.grpo, "sft-seed0": input.sft}}, "plots")

        rule stats_figures:  # stand-ins for the stats helper's figures, to exercise their captions
            output:
                forest=report("plots/forest.png", caption="report/forest.rst", category="Results"),
                accuracy=report("plots/accuracy.png", caption="report/accuracy.rst", category="Results")
            run:
                import shutil
                from mathpt.curves import plot_training_curves
                paths = plot_training_curves({{}}, "scratch")
                shutil.copy(paths["reward_val"], output.forest)
                shutil.copy(paths["reward_val"], output.accuracy)
    """)
    )
    run = [sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(tmp_path)]
    out = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = tmp_path / "results" / "report.html"
    report.parent.mkdir()  # snakemake --report does not create the report's folder
    out = subprocess.run(
        run + ["--report", str(report)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    page = _visible_text(report.read_text(encoding="utf-8"))
    for name in (
        "workflow",
        "forest",
        "accuracy",
        "curves_reward_val",
        "curves_loss_entropy",
        "curves_response_length",
    ):
        text = _visible_text((REPO / "report" / f"{name}.rst").read_text())
        assert text[:120] in page, name
    for fig in ("reward_val.png", "loss_entropy.png", "response_length.png", "forest.png", "accuracy.png"):
        assert fig in page
