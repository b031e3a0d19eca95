"""Rule tokenize: SFT shards + train/val prompt sets with the prompt template applied."""

from mathpt.io import read_jsonl
from mathpt.pipeline import run_script
from mathpt.shards import write_prompt_set, write_sft_shards


def main(smk, cfg):
    tok = cfg["tokenize"]
    write_sft_shards(
        smk.input.traces,
        smk.input.model,
        smk.output.shards,
        max_seq_len=tok["max_seq_len"],
        microbatch_size=tok["microbatch_size"],
        keep=cfg["keep"],
    )
    write_prompt_set(read_jsonl(smk.input.train), cfg["prompt_style"], smk.output.train_prompts)
    write_prompt_set(read_jsonl(smk.input.val), cfg["prompt_style"], smk.output.val_prompts)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
