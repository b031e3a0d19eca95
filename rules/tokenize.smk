rule tokenize:
    """SFT shards (safetensors + index) and the train/val prompt sets for rollouts and validation."""
    input:
        traces="results/traces/traces.jsonl",
        train="results/data/train.jsonl",
        val="results/data/val.jsonl",
        model="results/models/base",
    output:
        shards=directory("results/tokenized/sft"),
        train_prompts="results/tokenized/prompts/train.jsonl",
        val_prompts="results/tokenized/prompts/val.jsonl",
    log:
        "results/logs/tokenize.log",
    conda:
        "../envs/mathpt.yaml"
    threads: workflow.cores
    params:
        cfg=slice_of("tokenize"),
    script:
        "../scripts/tokenize.py"
