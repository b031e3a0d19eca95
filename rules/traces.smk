rule traces:
    """Teacher reasoning traces for the train prompts (gold, API or local model)."""
    input:
        train="results/data/train.jsonl",
        model="results/models/base",
    output:
        traces="results/traces/traces.jsonl",
        summary="results/traces/traces.summary.json",
    log:
        "results/logs/traces.log",
    conda:
        "../envs/mathpt.yaml"
    resources:
        gpu=gpus_for(LAYOUT, "infer") if config["teacher"]["kind"] == "local" else 0,
    params:
        cfg=slice_of("traces"),
    script:
        "../scripts/traces.py"
