"""Rule train: one checkpoint per (algorithm, seed), through mathpt.train."""
from pathlib import Path

from mathpt.gpus import gpus_for
from mathpt.pipeline import run_script
from mathpt.secrets import scrub


def main(smk, cfg):
    common = dict(out_dir=smk.output.checkpoint, run_dir=str(Path(smk.output.metrics).parent),
                  state_dir=smk.params.state_dir, wandb_cfg=smk.config.get("wandb"),
                  group=smk.config.get("experiment", "mathpt"), log_config=scrub(smk.config))
    if cfg["algo"] == "sft":
        from mathpt.train.sft import train_sft

        train_sft(cfg, init_dir=smk.input.init, shards_dir=smk.input.shards,
                  val_prompts_path=smk.input.val_prompts, **common)
    else:
        from mathpt.train.pg import train_pg

        train_pg(cfg, init_dir=smk.input.init, train_prompts_path=smk.input.train_prompts,
                 val_prompts_path=smk.input.val_prompts, **common)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main, gpus=gpus_for(snakemake.config["runtime"]["layout"], "train"))  # noqa: F821
