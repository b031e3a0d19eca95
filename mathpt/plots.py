"""Report figures: a forest plot of the paired differences and per-model accuracy bars.

Both take the rows of mathpt.ci_table (as returned, or read back from the CSV as strings) and
write a PNG atomically, so Snakemake never sees a half-written figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mathpt.io import MathptError, atomic_save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: rules run without a display
    import matplotlib.pyplot as plt

    return plt


def _f(v: Any) -> float:
    if v is None or v == "":
        return float("nan")
    return float(v)


def _save(fig, out_png: str | os.PathLike) -> None:
    atomic_save_figure(fig, out_png, dpi=120, bbox_inches="tight")


def _seed_label(seed: Any) -> str:
    s = str(seed)
    return "" if s == "" else (" [pooled]" if s == "pooled" else f" [seed {s}]")


def forest_plot(
    ci_rows: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike,
    title: str = "Paired differences (A - B), 95% CIs: per seed bootstrap, pooled t over seeds",
) -> None:
    """One line per comparison: point estimate, CI whiskers, a zero line; filled markers where the
    Holm-adjusted p < 0.05. Pooled rows (t-interval over seeds) are drawn bolder than per-seed rows
    (bootstrap over problems)."""
    if not ci_rows:
        raise MathptError(f"forest_plot({out_png}): no rows")
    plt = _pyplot()
    rows = list(ci_rows)[::-1]  # first row on top
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.38 * n))
    labels = []
    for y, r in enumerate(rows):
        d, lo, hi = _f(r["diff"]), _f(r["ci_low"]), _f(r["ci_high"])
        sig = _f(r.get("holm_p")) < 0.05
        pooled = str(r.get("seed")) == "pooled"
        color = "tab:blue" if pooled else "tab:gray"
        ax.plot([lo, hi], [y, y], color=color, lw=2.5 if pooled else 1.5)
        ax.plot([lo, lo], [y - 0.15, y + 0.15], color=color, lw=1)
        ax.plot([hi, hi], [y - 0.15, y + 0.15], color=color, lw=1)
        ax.plot(
            [d],
            [y],
            marker="o",
            ms=7 if pooled else 5,
            color=color,
            markerfacecolor=color if sig else "white",
        )
        task = f"{r['task']}: " if r.get("task") else ""
        labels.append(f"{task}{r['model_a']} − {r['model_b']}{_seed_label(r.get('seed', ''))}")
    ax.axvline(0.0, color="black", lw=1, ls="--")
    ax.set_yticks(range(n), labels)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("difference in score (A − B); filled = Holm p < 0.05")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, out_png)
    plt.close(fig)


def accuracy_bars(
    acc_rows: Sequence[Mapping[str, Any]], out_png: str | os.PathLike, title: str = "Accuracy with 95% CIs"
) -> None:
    """One bar per model (its pooled row if it has several seeds, else its single run) with CI
    whiskers; the individual seeds are overlaid as dots. Where the rows carry ``acc_any_format`` a
    hollow bar behind shows the accuracy ignoring the answer format: the gap is what format costs."""
    if not acc_rows:
        raise MathptError(f"accuracy_bars({out_png}): no rows")
    plt = _pyplot()
    models: dict[str, dict[str, list]] = {}
    for r in acc_rows:
        m = models.setdefault(str(r["model"]), {"summary": [], "seeds": []})
        (m["summary"] if str(r.get("seed")) in ("pooled", "") else m["seeds"]).append(r)
    names, acc, lo, hi, dots, any_fmt = [], [], [], [], [], []
    for name, m in models.items():
        summary = m["summary"][0] if m["summary"] else (m["seeds"][0] if len(m["seeds"]) == 1 else None)
        if summary is None:
            raise MathptError(f"accuracy_bars: model {name!r} has several seeds but no pooled row")
        a = _f(summary["acc"])
        names.append(name)
        acc.append(a)
        lo.append(max(0.0, a - _f(summary["ci_low"])))
        hi.append(max(0.0, _f(summary["ci_high"]) - a))
        dots.append([_f(r["acc"]) for r in m["seeds"]] if len(m["seeds"]) > 1 else [])
        any_fmt.append(_f(summary.get("acc_any_format")))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(names), 4.5))
    x = range(len(names))
    if any(math.isfinite(v) for v in any_fmt):
        ax.bar(
            x,
            [v if math.isfinite(v) else 0.0 for v in any_fmt],
            fill=False,
            edgecolor="tab:orange",
            lw=1.5,
            ls="--",
            label="answer right, any format",
        )
    ax.bar(
        x,
        acc,
        color="tab:blue",
        alpha=0.7,
        yerr=[lo, hi],
        capsize=6,
        ecolor="black",
        label="accuracy (style's format required)",
    )
    for i, ds in enumerate(dots):
        ax.plot([i] * len(ds), ds, "o", color="black", ms=4, alpha=0.7)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    top = max(
        [a + h for a, h in zip(acc, hi, strict=True) if math.isfinite(a + h)]
        + [v for v in any_fmt if math.isfinite(v)]
        or [1.0]
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.set_ylim(0, max(top * 1.1, 1e-3))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out_png)
    plt.close(fig)
