"""What `make run` prints at the end: where a finished run's outputs are, and the comparison table's lines."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from mathpt.algorithms import label, parse_model_name

OUTPUTS = (
    ("comparison table (paired CIs)", "ci_table.csv"),
    ("accuracy per model", "accuracy.csv"),
    ("regression checks (lm-eval)", "regressions.csv"),
    ("plots", "plots"),
    ("HTML report", "report.html"),
    ("run summary (what the README copies)", "summary.md"),
    ("logs", "logs"),
)


# Printed above a table without pooled rows: one training seed cannot tell training noise from an effect.
ONE_SEED = (
    "ONE TRAINING SEED: every interval below covers test-problem noise only, not training noise, so "
    "no row is a finding. Train 3 or more seeds (train.seeds: [0, 1, 2]) for the pooled rows, whose "
    "intervals cover both (README, 'Three training seeds of the quick start')."
)


def _fmt(v: str) -> str:
    try:
        return f"{float(v):+.3f}"
    except ValueError:
        return v or "-"


def _p(v: str | None) -> str:
    """A p-value in at most 7 characters: 0.0098, 3.6e-12 (never a truncated mantissa)."""
    try:
        p = float(v)
    except (TypeError, ValueError):
        return v or "-"
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _name(model: str) -> str:
    algo, seed = parse_model_name(model)
    return label(algo) + ("" if seed is None else f" (seed {seed})")


def table_lines(ci_csv: Path, limit: int = 12) -> list[str]:
    """One line per comparison: A - B, the difference and its CI, Holm-adjusted p; pooled rows first,
    primary before exploratory, per-seed diagnostics last."""
    rows = list(csv.DictReader(ci_csv.open(encoding="utf-8")))
    rows = [r for r in rows if r.get("family") != "diagnostic"] + [
        r for r in rows if r.get("family") == "diagnostic"
    ]
    rank = {"primary": 0, "exploratory": 1}
    rows.sort(
        key=lambda r: (
            r.get("seed") != "pooled",
            rank.get(r.get("family", ""), 2),
            r["model_a"],
            r["model_b"],
        )
    )
    lines = [f"  {'comparison':<46} {'diff':>7}  {'95% CI':>17}  {'holm p':>7}"]
    for r in rows[:limit]:
        a, b = (_name(r["model_a"]), _name(r["model_b"]))
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        lines.append(f"  {a + '  -  ' + b:<46} {_fmt(r['diff']):>7}  {ci:>17}  {_p(r.get('holm_p')):>7}")
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more rows in {ci_csv}")
    return lines


def summary(results: Path) -> str:
    out = [f"Results in {results}/:"]
    for what, name in OUTPUTS:
        path = results / name
        if path.exists():
            out.append(f"  {what:<32} {path}")
    ci = results / "ci_table.csv"
    if ci.exists():
        if not any(r.get("seed") == "pooled" for r in csv.DictReader(ci.open(encoding="utf-8"))):
            out += ["", ONE_SEED]
        out += [
            "",
            f"{ci} (accuracy differences on the test split; 95% CIs: pooled rows cover seeds and "
            "problems, per-seed rows problems only):",
            *table_lines(ci),
        ]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "results")))
