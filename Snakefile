# mathpt: raw GSM8K -> teacher traces -> tokenized shards -> one checkpoint per (algorithm, seed)
# -> GSM8K k-shot CoT eval + lm-eval suite -> paired bootstrap table results/ci_table.csv.
# Rules are thin; the logic lives in the mathpt package. See README.md.
from snakemake.utils import min_version

min_version("9.0")


# A named config (--configfile) means exactly that file plus the schema's defaults: the quick start is
# loaded only when none is named, because Snakemake would merge a named file over it and the quick
# start's keys (an arith-only teacher key, its batch sizes) would leak into every other experiment.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"


report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        "results/ci_table.csv",
        "results/accuracy.csv",
        "results/regressions.csv",
        "results/plots/forest.png",
        "results/plots/accuracy.png",
        "results/plots/reward_val.png",
        "results/summary.md",


include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/traces.smk"
include: "rules/tokenize.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/stats.smk"
