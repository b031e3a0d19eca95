"""Rule regressions: CIs of each trained model's change vs base on the lm-eval per-doc scores."""
from mathpt.ci_table import build_regressions_table, lm_eval_paths
from mathpt.pipeline import run_script
from mathpt.provenance import git_commit


def main(smk, cfg):
    per_doc = lm_eval_paths(smk.params.models, list(smk.input))
    st = cfg["stats"]
    build_regressions_table(per_doc, smk.output.table, {"code_version": git_commit()},
                            n_resamples=st["n_resamples"], seed=st["seed"])


run_script(snakemake, main)  # noqa: F821
