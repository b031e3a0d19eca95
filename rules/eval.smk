rule eval_gsm8k:
    """GSM8K eval on the test split with the trained prompt, 0-shot (primary), and, when
    eval.gsm8k.k_shot > 0, the k-shot CoT prompt from the same engine (kshot_* keys): one row per problem.
    """
    input:
        model=model_dir,
        test="results/data/test.jsonl",
        train="results/data/train.jsonl",
    output:
        rows="results/eval/{model}/gsm8k.jsonl",
        summary="results/eval/{model}/gsm8k_summary.json",
    log:
        "results/logs/eval/{model}-gsm8k.log",
    conda:
        "../envs/mathpt.yaml"
    threads: EVAL_THREADS
    resources:
        gpu=infer_gpus(),
    params:
        cfg=slice_of("eval_gsm8k"),
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
    log:
        "results/logs/eval/{model}-lm_eval.log",
    conda:
        "../envs/mathpt.yaml"
    threads: EVAL_THREADS
    resources:
        gpu=gpus_for(LAYOUT, "infer"),
    params:
        cfg=slice_of("eval_lm"),
    script:
        "../scripts/eval_lm.py"
