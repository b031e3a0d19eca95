rule base_model:
    """The base model directory: a hub id / local path, or the embedded tiny model built here."""
    input:
        train="results/data/train.jsonl",
    output:
        directory("results/models/base"),
    log:
        "results/logs/base_model.log",
    conda:
        "../envs/mathpt.yaml"
    threads: workflow.cores
    params:
        cfg=slice_of("base_model"),
    script:
        "../scripts/base_model.py"
