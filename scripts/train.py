"""Rule train: one checkpoint per (algorithm, seed), through mathpt.train; reads only its slice."""

from pathlib import Path

from mathpt.algorithms import trainer
from mathpt.pipeline import run_script
from mathpt.secrets import scrub


def main(smk, cfg):
    common = dict(
        out_dir=smk.output.checkpoint,
        run_dir=str(Path(smk.output.metrics).parent),
        state_dir=smk.params.state_dir,
        wandb_cfg=cfg["wandb"],
        group=cfg["experiment"],
        log_config=scrub(cfg),
        threads=smk.threads,  # on the cpu layout the trainer and its inference worker split them
    )
    trainer(cfg["algo"]).run(cfg, smk.input, **common)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821 - GPUs: the rule's resources.gpu
