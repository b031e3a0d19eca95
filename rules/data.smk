rule data:
    """GSM8K (hub, local directory or synthetic arith) -> train/val/test jsonl + manifest."""
    output:
        train="results/data/train.jsonl",
        val="results/data/val.jsonl",
        test="results/data/test.jsonl",
        manifest="results/data/manifest.json",
    params:
        cfg=slice_of("data"),
    log:
        "results/logs/data.log",
    script:
        "../scripts/data.py"
