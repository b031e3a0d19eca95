"""Rule ci_table: paired bootstrap comparisons -> results/ci_table.csv, accuracy table and plots."""

from mathpt.ci_table import build_accuracy_table, build_ci_table, group_runs
from mathpt.pipeline import run_script
from mathpt.plots import accuracy_bars, forest_plot
from mathpt.provenance import git_commit


def main(smk, cfg):
    evals = group_runs(dict(zip(smk.params.models, smk.input.evals, strict=True)))
    g = cfg["gsm8k"]
    meta = {
        "benchmark": cfg["benchmark"],
        "split": "test",
        "scorer": "mathpt.rewards:" + cfg["prompt_style"],
        "k_shot": 0,  # the primary eval: the trained prompt, 0-shot (acc_kshot holds the k-shot one)
        "k_shot_secondary": g["k_shot"],
        "decoding": f"greedy, max_new_tokens={g['max_new_tokens']}",
        "code_version": git_commit(),
        "task_versions": "",
    }
    st = cfg["stats"]
    rows = build_ci_table(evals, smk.output.table, meta, n_resamples=st["n_resamples"], seed=st["seed"])
    acc = build_accuracy_table(
        evals, smk.output.accuracy, meta, n_resamples=st["n_resamples"], seed=st["seed"]
    )
    forest_plot(rows, smk.output.forest)
    accuracy_bars(acc, smk.output.bars)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
