"""Rule summary: results/summary.md, the run's report, rendered from its output files."""

import os

from mathpt.pipeline import run_script
from mathpt.provenance import config_hash, git_commit
from mathpt.summary import build_summary


def main(smk, cfg):
    build_summary(
        smk.output.summary,
        accuracy_csv=smk.input.accuracy,
        ci_csv=smk.input.ci,
        regressions_csv=smk.input.regressions,
        eval_summaries=dict(zip(smk.params.models, smk.input.eval_summaries, strict=True)),
        traces_summary=smk.input.traces,
        metrics=dict(zip(smk.params.runs, smk.input.metrics, strict=True)),
        experiment=cfg["experiment"],
        code_version=git_commit(),
        config_files=[os.path.relpath(f) for f in smk.params.configfiles],
        config_hash=config_hash(cfg),
        figures=list(smk.input.figures),
        # each job's start-up record, read if present (not declared outputs: see mathpt.timing)
        timing_dir=os.path.join(os.path.dirname(str(smk.log[0])), "timing"),
    )


if __name__ == "__main__":
    run_script(snakemake, main)  # noqa: F821
