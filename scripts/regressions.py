"""Rule regressions: CIs of each trained model's change vs base on the lm-eval per-doc scores."""

import json
from pathlib import Path

from mathpt.ci_table import build_regressions_table, group_runs
from mathpt.pipeline import run_script
from mathpt.provenance import git_commit


def main(smk, cfg):
    per_doc, versions = {}, {}
    for model, out_dir in zip(smk.params.models, smk.input, strict=True):
        files = sorted(Path(out_dir).glob("per_doc_*.jsonl"))
        per_doc[model] = {f.stem.removeprefix("per_doc_"): str(f) for f in files}
        versions.update(json.loads((Path(out_dir) / "summary.json").read_text()).get("versions", {}))
    lm, st = cfg["lm_eval"], cfg["stats"]
    meta = {
        "split": "test",
        "k_shot": lm.get("num_fewshot"),
        "decoding": f"greedy, max_gen_toks={lm.get('max_gen_toks')}",
        "code_version": git_commit(),
        "task_versions": versions,
    }
    build_regressions_table(
        group_runs(per_doc), smk.output.table, meta, n_resamples=st["n_resamples"], seed=st["seed"]
    )


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
