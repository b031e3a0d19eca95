"""Rule eval_lm: the lm-eval regression suite with per-doc samples kept."""

from pathlib import Path

from mathpt.config import engine_kwargs
from mathpt.evaluation.lm_eval_suite import run_lm_eval_suite
from mathpt.pipeline import run_script


def main(smk, cfg):
    lm, rt = cfg["lm_eval"], cfg["runtime"]
    devices = ["cpu"] if rt["layout"] == "cpu" else ["cuda:0"]
    # lm-eval's vllm backend hands these to vllm.LLM; the hf backend takes none of them.
    model_kwargs = engine_kwargs(rt, "vllm", raw_vllm=True) if lm["backend"] == "vllm" else {}
    run_lm_eval_suite(
        smk.input.model,
        lm["tasks"],
        num_fewshot=lm["num_fewshot"],
        backend=lm["backend"],
        out_dir=smk.output.out,
        local_data_dir=str(Path(smk.input.test).parent),
        max_gen_toks=lm["max_gen_toks"],
        devices=devices,
        limit=lm["limit"],
        model_kwargs=model_kwargs,
    )


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821 - GPUs: the rule's resources.gpu
