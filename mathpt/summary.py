"""``results/summary.md``: one run's report, rendered from its output files and nothing else.

The README's result tables are copied from this file, so a documented number cannot drift from the
code and config that produced it: the commit, the experiment name, the config files and a hash of
the whole config are printed above the tables. The file holds no timestamp; two runs that produce
the same results produce the same summary except for its wall-time section.

Sections: accuracy per model (with the accuracy ignoring the answer format, the format rate and the
truncated fraction, so a gain that is only format shows as such), the paired comparisons (the pooled
t-over-seeds rows when there are several seeds, else the single-seed rows, flagged as not covering
between-seed variance), the lm-eval regressions, the teacher traces (truncated and empty
completions), wall times, and the figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mathpt.algorithms import BASE
from mathpt.ci_table import read_csv
from mathpt.io import MathptError, atomic_write_text, read_json


def _f(v: Any) -> float:
    if v is None or v == "":
        return float("nan")
    return float(v)


def _num(v: Any, digits: int = 3) -> str:
    x = _f(v)
    return "–" if not math.isfinite(x) else f"{x:.{digits}f}"


def _signed(v: Any, digits: int = 3) -> str:
    x = _f(v)
    return "–" if not math.isfinite(x) else f"{x:+.{digits}f}"


def _pct(v: Any) -> str:
    x = _f(v)
    return "–" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _p(v: Any) -> str:
    x = _f(v)
    if not math.isfinite(x):
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _ci(row: Mapping[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = _f(row["ci_low"]), _f(row["ci_high"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _seed(row: Mapping[str, Any]) -> str:
    s = str(row.get("seed", ""))
    return "–" if s == "" else s


def _headline_rows(rows: Sequence[Mapping[str, Any]], key: Sequence[str]) -> list[Mapping[str, Any]]:
    """Per group (``key`` columns): its pooled row if it has one, else its rows as they are."""
    pooled = {tuple(r[k] for k in key) for r in rows if str(r["seed"]) == "pooled"}
    return [r for r in rows if str(r["seed"]) == "pooled" or tuple(r[k] for k in key) not in pooled]


def _single_seed_note(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if any("NOT covered" in str(r.get("ci_covers", "")) for r in rows):
        return [
            "",
            "**One training seed:** these intervals cover test-problem noise only; the between-seed "
            "variance (training noise) is not covered, so a difference can flip with another seed. "
            "Train several seeds (`train.seeds`) for intervals that cover it.",
        ]
    return []


def accuracy_section(acc_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not acc_rows:
        raise MathptError("summary: accuracy.csv has no rows")
    r0 = acc_rows[0]
    lines = [
        f"## GSM8K accuracy ({r0['split']} split, n = {r0['n']}, trained prompt 0-shot, {r0['decoding']})",
        "",
    ]
    kshot = any(str(r.get("acc_kshot", "")) not in ("", "None") for r in acc_rows)
    body = []
    for r in acc_rows:
        body.append(
            [
                r["model"],
                _seed(r),
                _num(r["acc"]),
                _ci(r),
                _num(r["acc_any_format"]),
                _pct(r["format_rate"]),
                _pct(r["truncated_fraction"]),
                _num(r["mean_generated_tokens"], 1),
                r["ci_method"],
            ]
            + (
                [
                    _num(r.get("acc_kshot")),
                    _ci({"ci_low": r.get("kshot_ci_low"), "ci_high": r.get("kshot_ci_high")}),
                ]
                if kshot
                else []
            )
        )
    header = ["model", "seed", "accuracy", "95% CI", "right, any format", "format rate", "truncated"]
    header += ["mean tokens", "CI method"] + (["k-shot accuracy", "k-shot 95% CI"] if kshot else [])
    lines += _table(header, body)
    lines += [
        "",
        "*accuracy*: the answer is right **and** in the prompt style's format (the training reward). "
        "*right, any format*: the final answer is right however it was written (last box, "
        '"the answer is", else the last number). *format rate*: the style\'s answer format was '
        "found. *truncated*: generation hit `eval.gsm8k.max_new_tokens` (graded wrong). "
        "CIs: `wilson` over test problems for one run; `seeds_x_problems_t` (seeds and problems) for "
        "the pooled row. *k-shot*: the secondary eval with `eval.gsm8k.k_shot` examples (the original "
        "study's prompt); the primary eval is the trained prompt, 0-shot.",
    ]
    lines += _single_seed_note(acc_rows)
    lines += ["", *format_gain_lines(acc_rows)]
    return lines


def format_gain_lines(acc_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each trained model's change over SFT in accuracy, in accuracy ignoring format and in format rate."""
    head = {r["model"]: r for r in _headline_rows(acc_rows, ["model"])}
    ref = "sft" if "sft" in head else BASE if BASE in head else None
    if ref is None or len(head) < 2:
        return []
    body = []
    for model, r in head.items():
        if model in (ref, BASE):
            continue
        d_acc = _f(r["acc"]) - _f(head[ref]["acc"])
        d_any = _f(r["acc_any_format"]) - _f(head[ref]["acc_any_format"])
        d_fmt = _f(r["format_rate"]) - _f(head[ref]["format_rate"])
        body.append([model, f"{d_acc:+.3f}", f"{d_any:+.3f}", f"{100 * d_fmt:+.1f} pts"])
    if not body:
        return []
    lines = [f"### What changed against {ref}: answers or format?", ""]
    lines += _table(["model", f"accuracy − {ref}", f"right any format − {ref}", f"format rate − {ref}"], body)
    lines += ["", "A gain in accuracy without a gain in *right, any format* is a gain in answer format only."]
    return lines


def power_lines(head: Sequence[Mapping[str, Any]]) -> list[str]:
    """The power line: per headline comparison, the smallest difference detected with 80% power."""
    rows = [r for r in head if math.isfinite(_f(r.get("mde80")))]
    if not rows:
        return []
    parts = []
    for r in rows:
        holm = _f(r.get("mde80_holm"))
        extra = f" (±{_num(holm)} at Holm's first-step level)" if math.isfinite(holm) else ""
        parts.append(f"{r['model_a']} − {r['model_b']} ±{_num(r['mde80'])}{extra}")
    return [
        "",
        "**Power:** smallest difference this design detects with 80% power (two-sided 5%, unadjusted, "
        "from each row's SE and df; for primary rows also at 0.05 / the primary family's size, the "
        "level Holm's first step uses): " + "; ".join(parts) + ".",
    ]


def comparisons_section(ci_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not ci_rows:
        return []
    head = [r for r in ci_rows if r.get("family", "") != "diagnostic"]
    head.sort(key=lambda r: r.get("family", "") != "primary")
    body = [
        [
            f"{r['model_a']} − {r['model_b']}",
            r.get("family", ""),
            _seed(r),
            _num(r["acc_a"]),
            _num(r["acc_b"]),
            _signed(r["diff"]),
            _ci(r, signed=True),
            _num(r.get("mde80")),
            r["ci_method"],
            r["p_method"],
            _p(r["holm_p"]),
        ]
        for r in head
    ]
    lines = ["## Paired comparisons (A − B on the same test problems)", ""]
    lines += _table(
        [
            "comparison",
            "family",
            "seed",
            "acc A",
            "acc B",
            "diff",
            "95% CI",
            "MDE 80%",
            "CI method",
            "test",
            "Holm p",
        ],
        body,
    )
    lines += [
        "",
        "Pooled rows (`seeds_x_problems_t`): t-interval that covers both training-seed and test-problem "
        "noise (two-way seeds × problems variance, Satterthwaite-type df ≥ seeds − 1; README, "
        "ci_table.csv). Single-seed rows (`paired_bootstrap_percentile`): bootstrap over test problems "
        "with the same resample for both models; exact McNemar p. *primary*: the pre-declared family "
        "(each PG variant − SFT, GRPO-clip − REINFORCE + baseline), Holm-adjusted together; "
        "*exploratory*: the rest, Holm-adjusted among themselves. Per-seed diagnostic rows: "
        "`ci_table.csv`.",
    ]
    lines += power_lines(head)
    lines += _single_seed_note(ci_rows)
    return lines


def regressions_section(reg_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not reg_rows:
        return []
    head = [r for r in reg_rows if r.get("family", "") != "diagnostic"]
    body = [
        [
            r["task"],
            r["metric"],
            f"{r['model_a']} − {r['model_b']}",
            _seed(r),
            _signed(r["diff"], 4),
            _ci(r, signed=True),
            _p(r["holm_p"]),
        ]
        for r in head
    ]
    lines = ["## lm-eval regressions (trained model − base)", ""]
    lines += _table(["task", "metric", "comparison", "seed", "diff", "95% CI", "Holm p"], body)
    lines += [
        "",
        "Differences are in each metric's own units: for accuracy-like metrics and log-likelihood higher "
        "is better; for perplexity lower is better, so there a positive difference is a regression.",
    ]
    return lines


def traces_section(traces: Mapping[str, Any] | None) -> list[str]:
    if not traces:
        return []
    n = traces.get("n_traces") or 0
    keys = [
        ("traces", "n_traces"),
        ("correct", "n_correct"),
        ("no committed answer", "n_no_answer"),
        ("truncated (finish_reason length)", "n_truncated"),
        ("empty / answer-only", "n_empty"),
    ]
    body = [
        [label, str(traces.get(k, "–")), _pct(traces[k] / n) if n and isinstance(traces.get(k), int) else "–"]
        for label, k in keys
    ]
    lines = [
        f"## Teacher traces ({traces.get('teacher', '?')}, {traces.get('samples_per_prompt', 1)} per prompt)",
        "",
    ]
    lines += _table(["", "count", "share"], body)
    lines += ["", "Truncated and empty completions are never counted correct (`mathpt.teachers.cleaning`)."]
    return lines


def _minutes(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def wall_section(train_s: Mapping[str, float], eval_s: Mapping[str, float]) -> list[str]:
    names = sorted(set(train_s) | set(eval_s), key=lambda m: (m != BASE, m))
    rows = [[name, _minutes(train_s.get(name)), _minutes(eval_s.get(name))] for name in names]
    if not rows:
        return []
    lines = ["## Wall time", ""]
    lines += _table(["model", "training (first to last logged step)", "GSM8K eval"], rows)
    return lines


def startup_section(timings: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per job: seconds from process start to each milestone (``mathpt.timing``)."""
    if not timings:
        return []
    cols = ("imports", "engine_ready", "first_output", "first_step", "end")

    def cell(rec: Mapping[str, Any], key: str) -> str:
        v = rec.get("since_start_s", {}).get(key)
        return f"{float(v):.1f}" if isinstance(v, int | float) else "–"

    rows = [[f"`{r['job']}`", *(cell(r, c) for c in cols)] for r in timings]
    lines = ["## Job start-up (seconds since the job's process started)", ""]
    lines += _table(["job", "imports done", "engine ready", "first output", "first train step", "end"], rows)
    lines += [
        "",
        "From `results/logs/timing/` (written by each job, not a declared output: rows appear for the jobs "
        "that ran in this results tree). First output is the end of the first generation call.",
    ]
    return lines


def metrics_span_s(path: str | os.PathLike) -> float | None:
    """Seconds between the first and last row of a run's metrics.jsonl (None if under two rows)."""
    from mathpt.tracking import read_metrics

    times = [r["time"] for r in read_metrics(path) if isinstance(r.get("time"), int | float)]
    return float(max(times) - min(times)) if len(times) >= 2 else None


def render_summary(
    *,
    experiment: str,
    code_version: str,
    config_files: Sequence[str],
    config_hash: str,
    acc_rows: Sequence[Mapping[str, Any]],
    ci_rows: Sequence[Mapping[str, Any]],
    reg_rows: Sequence[Mapping[str, Any]] = (),
    traces: Mapping[str, Any] | None = None,
    train_s: Mapping[str, float] | None = None,
    eval_s: Mapping[str, float] | None = None,
    timings: Sequence[Mapping[str, Any]] = (),
    figures: Sequence[str] = (),
) -> str:
    """The summary as markdown (pure: the same arguments give the same text)."""
    configs = ", ".join(f"`{c}`" for c in config_files) or "–"
    lines = [
        f"# Results: {experiment}",
        "",
        f"- commit: `{code_version}`",
        f"- config: {configs} (config hash `{config_hash}`)",
        "- regenerate: `make summary` (or `snakemake results/summary.md`) after a run of that config",
        "",
    ]
    sections = (
        accuracy_section(acc_rows),
        comparisons_section(ci_rows),
        regressions_section(reg_rows),
        traces_section(traces),
        wall_section(train_s or {}, eval_s or {}),
        startup_section(timings),
    )
    for section in sections:
        if section:
            lines += [*section, ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(lines).rstrip() + "\n"


def build_summary(
    out_md: str | os.PathLike,
    *,
    accuracy_csv: str | os.PathLike,
    ci_csv: str | os.PathLike,
    regressions_csv: str | os.PathLike | None,
    eval_summaries: Mapping[str, str | os.PathLike],
    traces_summary: str | os.PathLike | None,
    metrics: Mapping[str, str | os.PathLike],
    experiment: str,
    code_version: str,
    config_files: Sequence[str],
    config_hash: str,
    figures: Sequence[str | os.PathLike] = (),
    timing_dir: str | os.PathLike | None = None,
) -> str:
    """Read a run's outputs, render the summary and write it atomically to ``out_md``; return the text.

    ``eval_summaries``/``metrics`` are keyed by model name; figure paths are written relative to
    ``out_md``'s directory, so the markdown renders from where it lies. ``timing_dir`` holds the jobs'
    start-up records (``mathpt.timing``), read if present: they are not declared outputs.
    """
    from mathpt.timing import read_timings

    out_dir = Path(out_md).parent
    text = render_summary(
        experiment=experiment,
        code_version=code_version,
        config_files=config_files,
        config_hash=config_hash,
        acc_rows=read_csv(accuracy_csv),
        ci_rows=read_csv(ci_csv),
        reg_rows=read_csv(regressions_csv) if regressions_csv else (),
        traces=read_json(traces_summary) if traces_summary else None,
        train_s={m: s for m, p in metrics.items() if (s := metrics_span_s(p)) is not None},
        eval_s={m: float(read_json(p)["elapsed_s"]) for m, p in eval_summaries.items()},
        timings=read_timings(timing_dir) if timing_dir else (),
        figures=[os.path.relpath(f, out_dir) for f in figures],
    )
    atomic_write_text(out_md, text)
    return text
