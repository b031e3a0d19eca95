"""Rule train: one checkpoint per (algorithm, seed), through mathpt.train; reads only its slice."""

from pathlib import Path

from mathpt.algorithms import trainer
from mathpt.pipeline import run_script
from mathpt.runtime.worker import share_cpu_threads
from mathpt.secrets import scrub


def main(smk, cfg):
    if cfg["runtime"]["layout"] == "cpu":  # trainer and inference worker split the job's cores
        share_cpu_threads(smk.threads)
    common = dict(
        out_dir=smk.output.checkpoint,
        run_dir=str(Path(smk.output.metrics).parent),
        state_dir=smk.params.state_dir,
        wandb_cfg=cfg["wandb"],
        group=cfg["experiment"],
        log_config=scrub(cfg),
    )
    trainer(cfg["algo"]).run(cfg, smk.input, **common)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821 - GPUs: the rule's resources.gpu
