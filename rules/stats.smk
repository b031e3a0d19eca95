rule ci_table:
    """Paired bootstrap comparisons of the GSM8K evals -> results/ci_table.csv (+ accuracy table, plots)."""
    input:
        evals=expand("results/eval/{model}/gsm8k.jsonl", model=MODELS),
        summaries=expand("results/eval/{model}/gsm8k_summary.json", model=MODELS),
    output:
        table=report("results/ci_table.csv", category="Results", caption="../report/ci_table.rst"),
        accuracy=report("results/accuracy.csv", category="Results", caption="../report/accuracy.rst"),
        forest=report("results/plots/forest.png", category="Results", caption="../report/forest.rst"),
        bars=report("results/plots/accuracy.png", category="Results", caption="../report/accuracy.rst"),
    params:
        cfg=slice_of("ci_table"),
        models=MODELS,
    log:
        "results/logs/ci_table.log",
    script:
        "../scripts/ci_table.py"


rule regressions:
    """CIs of every trained model's change vs base on the lm-eval tasks' per-doc scores."""
    input:
        expand("results/eval/{model}/lm_eval", model=MODELS),
    output:
        table=report("results/regressions.csv", category="Results", caption="../report/regressions.rst"),
    params:
        cfg=slice_of("regressions"),
        models=MODELS,
    log:
        "results/logs/regressions.log",
    script:
        "../scripts/regressions.py"


rule curves:
    """Training curves from the local metrics files (reward and val accuracy, loss/entropy, lengths)."""
    input:
        expand("results/runs/{run}/metrics.jsonl", run=RUNS),
    output:
        reward_val=report("results/plots/reward_val.png", category="Training", caption="../report/curves_reward_val.rst"),
        loss_entropy=report("results/plots/loss_entropy.png", category="Training", caption="../report/curves_loss_entropy.rst"),
        lengths=report("results/plots/response_length.png", category="Training", caption="../report/curves_response_length.rst"),
    params:
        runs=RUNS,
    log:
        "results/logs/curves.log",
    script:
        "../scripts/curves.py"
