rule eval_gsm8k:
    """GSM8K k-shot CoT eval on the test split: one row per problem + a summary."""
    input:
        model=model_dir,
        test="results/data/test.jsonl",
        train="results/data/train.jsonl",
    output:
        rows="results/eval/{model}/gsm8k.jsonl",
        summary="results/eval/{model}/gsm8k_summary.json",
    params:
        cfg=slice_of("eval_gsm8k"),
    threads: workflow.cores
    resources:
        gpu=infer_gpus(),
    log:
        "results/logs/eval/{model}-gsm8k.log",
    script:
        "../scripts/eval_gsm8k.py"


rule eval_lm:
    """The lm-eval regression suite; per-doc scores kept for paired statistics."""
    input:
        model=model_dir,
        test="results/data/test.jsonl",
        train="results/data/train.jsonl",
    output:
        out=directory("results/eval/{model}/lm_eval"),
    params:
        cfg=slice_of("eval_lm"),
    threads: workflow.cores
    resources:
        gpu=gpus_for(LAYOUT, "infer"),
    log:
        "results/logs/eval/{model}-lm_eval.log",
    script:
        "../scripts/eval_lm.py"
