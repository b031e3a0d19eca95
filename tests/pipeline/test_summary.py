"""results/summary.md is rendered from a run's output files only, deterministically, and says what it shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mathpt import ci_table, summary
from mathpt.io import read_json

META = {
    "benchmark": "gsm8k",
    "split": "test",
    "scorer": "mathpt.rewards:r1_zero",
    "k_shot": 4,
    "decoding": "greedy, max_new_tokens=64",
    "code_version": "abc123",
    "task_versions": "",
}
N, R = 80, 300


def _eval(path, rng, acc, fmt):
    rows = []
    for i in range(N):
        right, formatted = bool(rng.random() < acc), bool(rng.random() < fmt)
        rows.append(
            {
                "index": i,
                "id": f"test-{i:05d}",
                "gold": str(i),
                "correct": right and formatted,
                "formatted": formatted,
                "correct_any_format": right,
                "truncated": bool(rng.random() < 0.1),
                "generated_tokens": int(rng.integers(5, 60)),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(tmp_path, seeds):
    rng = np.random.default_rng(0)
    models = {"base": (0.1, 0.2), "sft": (0.5, 0.1), "grpo_clip": (0.55, 0.95)}  # grpo's gain: format only
    evals, eval_summaries, metrics = {}, {}, {}
    for model, (acc, fmt) in models.items():
        for s in [None] if model == "base" else seeds:
            name = ci_table.model_name(model, s)
            evals.setdefault(model, {})[s] = _eval(tmp_path / f"{name}.jsonl", rng, acc, fmt)
            eval_summaries[name] = tmp_path / f"{name}_summary.json"
            eval_summaries[name].write_text(json.dumps({"elapsed_s": 12.5}))
            if s is not None:
                metrics[name] = tmp_path / f"{name}_metrics.jsonl"
                metrics[name].write_text(
                    "".join(
                        json.dumps({"kind": "train", "step": k, "time": 1000.0 + 90 * k, "loss": 1.0}) + "\n"
                        for k in range(3)
                    )
                )
    ci_table.build_ci_table(evals, tmp_path / "ci_table.csv", META, n_resamples=R)
    acc_rows = ci_table.build_accuracy_table(evals, tmp_path / "accuracy.csv", META, n_resamples=R)
    traces = tmp_path / "traces.summary.json"
    traces.write_text(
        json.dumps(
            {
                "teacher": "api:deepseek-reasoner",
                "samples_per_prompt": 1,
                "n_traces": 10,
                "n_correct": 6,
                "n_no_answer": 1,
                "n_truncated": 3,
                "n_empty": 1,
            }
        )
    )
    (tmp_path / "plots").mkdir()
    out = tmp_path / "summary.md"
    kw = dict(
        accuracy_csv=tmp_path / "accuracy.csv",
        ci_csv=tmp_path / "ci_table.csv",
        regressions_csv=None,
        eval_summaries=eval_summaries,
        traces_summary=traces,
        metrics=metrics,
        experiment="arith-cpu",
        code_version="deadbeef",
        config_files=["config/arith.yaml"],
        config_hash="0123abcd",
        figures=[tmp_path / "plots" / "accuracy.png"],
    )
    text = summary.build_summary(out, **kw)
    return text, out, kw, acc_rows


def test_summary_names_the_run_and_shows_every_model_with_rates(tmp_path):
    text, out, kw, acc_rows = _run(tmp_path, [0, 1])
    assert out.read_text() == text
    assert text.startswith("# Results: arith-cpu\n")
    assert "`deadbeef`" in text and "`config/arith.yaml`" in text and "`0123abcd`" in text
    for r in acc_rows:  # every accuracy row, with its accuracy-ignoring-format, format and truncated rates
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith(f"| {r['model']} | {'–' if r['seed'] == '' else r['seed']} |")
        )
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == f"{r['acc']:.3f}" and cells[4] == f"{r['acc_any_format']:.3f}"
        assert (
            cells[5] == f"{100 * r['format_rate']:.1f}%"
            and cells[6] == f"{100 * r['truncated_fraction']:.1f}%"
        )
    # Format-versus-answer table: grpo_clip against sft, from the pooled rows.
    pooled = {r["model"]: r for r in acc_rows if r["seed"] == "pooled"}
    d_acc = pooled["grpo_clip"]["acc"] - pooled["sft"]["acc"]
    d_any = pooled["grpo_clip"]["acc_any_format"] - pooled["sft"]["acc_any_format"]
    assert f"| grpo_clip | {d_acc:+.3f} | {d_any:+.3f} |" in text
    assert "grpo_clip − sft | primary | pooled" in text and "seeds_x_problems_t" in text
    assert "**Power:** smallest difference" in text and "grpo_clip − sft ±" in text
    assert "One training seed" not in text
    assert "| truncated (finish_reason length) | 3 | 30.0% |" in text
    assert "| sft-seed0 | 3.0 min | 12 s |" in text  # metrics span 180 s; eval elapsed_s 12.5
    assert "![accuracy](plots/accuracy.png)" in text
    # Deterministic: the same outputs give the same bytes (no timestamp).
    assert summary.build_summary(tmp_path / "again.md", **kw) == text


def test_single_seed_summary_warns_that_seed_variance_is_not_covered(tmp_path):
    text, *_ = _run(tmp_path, [0])
    assert "**One training seed:**" in text and "| pooled |" not in text
    assert "grpo_clip − sft | primary | 0 |" in text


def test_summary_reads_real_traces_and_eval_keys(tmp_path):
    """The keys the summary reads are the ones the traces and eval stages write."""
    from mathpt.teachers.dispatch import generate_traces, summary_path

    rows = [
        {
            "id": f"train-{i}",
            "question": f"What is {i} + 1?",
            "solution": f"{i} + 1 = {i + 1}",
            "answer": str(i + 1),
        }
        for i in range(3)
    ]
    generate_traces({"kind": "gold"}, rows, "r1_zero", tmp_path / "t.jsonl", tmp_path / "w")
    s = read_json(summary_path(tmp_path / "t.jsonl"))
    lines = summary.traces_section(s)
    assert "| truncated (finish_reason length) | 0 | 0.0% |" in lines and "| traces | 3 | 100.0% |" in lines
    with pytest.raises(Exception, match="no rows"):
        summary.accuracy_section([])
