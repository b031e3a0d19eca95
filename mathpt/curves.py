"""Training curves from the local ``metrics.jsonl`` files (no W&B needed), rendered to PNG for the report.

Three figures, every run on each, one colour per algorithm (seeds share it, different line styles):
``reward_val.png`` (mean rollout reward and validation accuracy vs optimizer step),
``loss_entropy.png`` (loss and entropy, one row per algorithm) and ``response_length.png``
(mean and max response length). SFT logs no reward, so it is simply absent from the reward panel.
A panel with nothing to draw says "no data" instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mathpt.algorithms import ALGOS, parse_model_name
from mathpt.algorithms import label as algo_label
from mathpt.io import atomic_save_figure
from mathpt.tracking import read_metrics

_LINESTYLES = ("-", "--", ":", "-.")


def series(rows: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in rows of ``kind``, sorted by step; missing/null values skipped.

    If a step was logged more than once (a resumed run that was not truncated) the last row wins.
    """
    by_step: dict[int, float] = {}
    for r in rows:
        if r.get("kind") == kind and r.get(key) is not None:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _style(runs: list[str]) -> dict[str, dict]:
    """Matplotlib line kwargs per run: colour by algorithm, line style by seed index."""
    import matplotlib.pyplot as plt

    algos = _sorted_algos(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {a: colors[i % len(colors)] for i, a in enumerate(algos)}
    seen: dict[str, int] = {}
    out = {}
    for run in sorted(
        runs, key=lambda r: (algos.index(parse_model_name(r)[0]), parse_model_name(r)[1] or 0, r)
    ):
        algo = parse_model_name(run)[0]
        i = seen.get(algo, 0)
        seen[algo] = i + 1
        out[run] = {"color": color[algo], "linestyle": _LINESTYLES[i % len(_LINESTYLES)], "label": run}
    return out


def _plot_panel(
    ax,
    data: Mapping[str, list[dict]],
    styles: dict,
    kind: str,
    key: str,
    title: str,
    ylabel: str,
    *,
    marker: str | None = None,
    extra: tuple[str, str] | None = None,
) -> None:
    """One panel: ``key`` of ``kind`` rows for every run; ``extra=(key, suffix)`` adds a thin second line."""
    drawn = False
    for run, rows in data.items():
        steps, vals = series(rows, kind, key)
        if steps:
            ax.plot(steps, vals, marker=marker, markersize=3, **styles[run])
            drawn = True
        if extra is not None:
            steps, vals = series(rows, kind, extra[0])
            if steps:
                # "_"-prefixed labels stay out of the legend; the panel title says which line is which
                st = {**styles[run], "label": f"_{run} {extra[1]}", "linewidth": 0.8, "alpha": 0.6}
                ax.plot(steps, vals, **st)
                drawn = True
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    else:
        ax.text(
            0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14, color="gray"
        )
        ax.set_xticks([])
        ax.set_yticks([])


def _sorted_algos(runs) -> list[str]:
    return sorted(
        {parse_model_name(r)[0] for r in runs},
        key=lambda a: (ALGOS.index(a) if a in ALGOS else len(ALGOS), a),
    )


def make_figures(data: Mapping[str, list[dict]]) -> dict:
    """``{figure name: matplotlib Figure}`` for runs given as ``{run name: metrics rows}``."""
    import matplotlib.pyplot as plt

    styles = _style(list(data))
    data = {run: data[run] for run in styles}  # legend order: by algorithm, then seed
    figs = {}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_panel(axes[0], data, styles, "train", "reward_mean", "Mean rollout reward", "reward")
    _plot_panel(axes[1], data, styles, "eval", "accuracy", "Validation accuracy", "accuracy", marker="o")
    figs["reward_val"] = fig

    algos = _sorted_algos(data)
    rows = max(len(algos), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.2 * rows), squeeze=False)
    if not algos:
        _plot_panel(axes[0][0], {}, styles, "train", "loss", "Loss", "loss")
        _plot_panel(axes[0][1], {}, styles, "train", "entropy", "Entropy", "nats/token")
    for i, algo in enumerate(algos):
        sub = {r: rs for r, rs in data.items() if parse_model_name(r)[0] == algo}
        label = algo_label(algo)
        _plot_panel(axes[i][0], sub, styles, "train", "loss", f"{label}: loss", "loss")
        _plot_panel(axes[i][1], sub, styles, "train", "entropy", f"{label}: entropy", "nats/token")
    figs["loss_entropy"] = fig

    fig, ax = plt.subplots(1, 1, figsize=(8, 4.5))
    _plot_panel(
        ax,
        data,
        styles,
        "train",
        "response_length_mean",
        "Response length (thin: max)",
        "tokens",
        extra=("response_length_max", "max"),
    )
    figs["response_length"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def plot_training_curves(
    metrics: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, dpi: int = 120
) -> dict[str, Path]:
    """Render the three training-curve PNGs into ``out_dir``; returns ``{figure name: png path}``.

    ``metrics`` maps run names (``"{algo}-seed{seed}"``) to their ``metrics.jsonl``. A missing file
    raises DataError; an empty file or missing keys just leave "no data" panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {run: read_metrics(path) for run, path in metrics.items()}
    paths: dict[str, Path] = {}
    for name, fig in make_figures(data).items():
        paths[name] = atomic_save_figure(fig, out_dir / f"{name}.png", dpi=dpi)
        plt.close(fig)
    return paths
