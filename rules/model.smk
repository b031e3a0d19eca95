rule base_model:
    """The base model directory: a hub id / local path, or the embedded tiny model built here."""
    input:
        train="results/data/train.jsonl",
    output:
        directory("results/models/base"),
    params:
        cfg=slice_of("base_model"),
    threads: workflow.cores
    log:
        "results/logs/base_model.log",
    script:
        "../scripts/base_model.py"
