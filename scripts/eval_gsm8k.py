"""Rule eval_gsm8k: k-shot CoT eval on the GSM8K test split, data-parallel over shards."""
from mathpt.evaluation.gsm8k_eval import run_gsm8k_eval, write_eval
from mathpt.io import read_jsonl
from mathpt.pipeline import run_script


def main(smk, cfg):
    g, rt = cfg["gsm8k"], cfg["runtime"]
    shards = g.get("num_shards", 1)
    devices = ["cpu"] * shards if rt["layout"] == "cpu" else [f"cuda:{i}" for i in range(shards)]
    engine_kwargs = {"max_model_len": rt["max_model_len"]}
    if rt["engine"] == "vllm":
        engine_kwargs["gpu_memory_utilization"] = rt["gpu_memory_utilization"]
    rows, summary = run_gsm8k_eval(
        smk.input.model, read_jsonl(smk.input.test), read_jsonl(smk.input.train), k_shot=g["k_shot"],
        style=cfg["prompt_style"], max_new_tokens=g["max_new_tokens"], engine=rt["engine"],
        num_shards=shards, devices=devices, engine_kwargs=engine_kwargs, fewshot_seed=g.get("fewshot_seed", 0))
    write_eval(rows, summary, smk.output.rows, smk.output.summary)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    layout = snakemake.config["runtime"]["layout"]  # noqa: F821
    n = 0 if layout == "cpu" else snakemake.config["eval"]["gsm8k"].get("num_shards", 1)  # noqa: F821
    run_script(snakemake, main, gpus=n)  # noqa: F821
