"""Rule eval_gsm8k: k-shot CoT eval on the GSM8K test split, data-parallel over shards."""

from mathpt.config import engine_kwargs
from mathpt.evaluation.gsm8k_eval import run_gsm8k_eval, write_eval
from mathpt.io import read_jsonl
from mathpt.pipeline import run_script


def main(smk, cfg):
    g, rt = cfg["gsm8k"], cfg["runtime"]
    devices = (
        ["cpu"] * g["num_shards"] if rt["layout"] == "cpu" else [f"cuda:{i}" for i in range(g["num_shards"])]
    )
    rows, summary = run_gsm8k_eval(
        smk.input.model,
        read_jsonl(smk.input.test),
        read_jsonl(smk.input.train),
        k_shot=g["k_shot"],
        style=cfg["prompt_style"],
        max_new_tokens=g["max_new_tokens"],
        engine=rt["engine"],
        num_shards=g["num_shards"],
        devices=devices,
        engine_kwargs=engine_kwargs(rt, rt["engine"]),
        fewshot_seed=g["fewshot_seed"],
    )
    write_eval(rows, summary, smk.output.rows, smk.output.summary)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821 - GPUs: the rule's resources.gpu
