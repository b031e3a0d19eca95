"""Rule data: GSM8K (or synthetic arith) -> results/data/{train,val,test}.jsonl + manifest."""

from pathlib import Path

from mathpt.data import prepare_data
from mathpt.pipeline import run_script


def main(smk, cfg):
    if cfg["source"] == "arith":
        source = {"name": "arith", **cfg["arith"]}
    else:
        source = {"name": "gsm8k", "origin": cfg["source"], "dir": cfg["local_dir"]}
    prepare_data(
        source,
        Path(smk.output.train).parent,
        val_size=cfg["val_size"],
        seed=cfg["seed"],
        limits=cfg["limits"],
    )


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821 - injected by Snakemake
