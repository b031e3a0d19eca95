"""Rule curves: training-curve plots from the local metrics files."""

from pathlib import Path

from mathpt.curves import plot_training_curves
from mathpt.pipeline import run_script


def main(smk, cfg):
    metrics = {run: path for run, path in zip(smk.params.runs, smk.input, strict=True)}
    plot_training_curves(metrics, Path(smk.output.reward_val).parent)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
