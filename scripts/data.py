"""Rule data: GSM8K (or synthetic arith) -> results/data/{train,val,test}.jsonl + manifest."""
from pathlib import Path

from mathpt.data import prepare_data
from mathpt.pipeline import run_script


def main(smk, cfg):
    prepare_data(cfg, Path(smk.output.train).parent)


run_script(snakemake, main)  # noqa: F821 - injected by Snakemake
