rule train:
    """One checkpoint per (algorithm, seed); resumable state lives in results/state/ (not an output)."""
    input:
        init=train_init,
        shards="results/tokenized/sft",
        train_prompts="results/tokenized/prompts/train.jsonl",
        val_prompts="results/tokenized/prompts/val.jsonl",
    output:
        checkpoint=directory("results/checkpoints/{algo}-seed{seed}"),
        metrics=report(
            "results/runs/{algo}-seed{seed}/metrics.jsonl",
            category="Training",
            caption="../report/metrics.rst",
        ),
    log:
        "results/logs/train/{algo}-seed{seed}.log",
    conda:
        "../envs/mathpt.yaml"
    threads: workflow.cores
    resources:
        gpu=gpus_for(LAYOUT, "train"),
    params:
        cfg=lambda wc: slice_of("train", algo=wc.algo, seed=wc.seed),
        state_dir=lambda wc: f"results/state/{wc.algo}-seed{wc.seed}",
    script:
        "../scripts/train.py"
