rule data:
    """GSM8K (hub, local directory or synthetic arith) -> train/val/test jsonl + manifest."""
    output:
        train="results/data/train.jsonl",
        val="results/data/val.jsonl",
        test="results/data/test.jsonl",
        manifest="results/data/manifest.json",
    log:
        "results/logs/data.log",
    conda:
        "../envs/mathpt.yaml"
    params:
        cfg=slice_of("data"),
    script:
        "../scripts/data.py"
