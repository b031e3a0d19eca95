"""Rule base_model: materialize the base model directory (pretrained or the embedded tiny model)."""

from mathpt.models import materialize_base_model
from mathpt.pipeline import run_script


def main(smk, cfg):
    materialize_base_model(cfg, train_path=smk.input.train, out_dir=smk.output[0])


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
