rule ci_table:
    """Paired comparisons of the GSM8K evals -> results/ci_table.csv (+ accuracy table, plots)."""
    input:
        evals=expand("results/eval/{model}/gsm8k.jsonl", model=MODELS),
        summaries=expand("results/eval/{model}/gsm8k_summary.json", model=MODELS),
    output:
        table=report(
            "results/ci_table.csv",
            category="Results",
            caption="../report/ci_table.rst",
        ),
        accuracy=report(
            "results/accuracy.csv",
            category="Results",
            caption="../report/accuracy.rst",
        ),
        forest=report(
            "results/plots/forest.png",
            category="Results",
            caption="../report/forest.rst",
        ),
        bars=report(
            "results/plots/accuracy.png",
            category="Results",
            caption="../report/accuracy.rst",
        ),
    log:
        "results/logs/ci_table.log",
    conda:
        "../envs/mathpt.yaml"
    params:
        cfg=slice_of("ci_table"),
        models=MODELS,
    script:
        "../scripts/ci_table.py"


rule regressions:
    """CIs of every trained model's change vs base on the lm-eval tasks' per-doc scores."""
    input:
        expand("results/eval/{model}/lm_eval", model=MODELS),
    output:
        table=report(
            "results/regressions.csv",
            category="Results",
            caption="../report/regressions.rst",
        ),
    log:
        "results/logs/regressions.log",
    conda:
        "../envs/mathpt.yaml"
    params:
        cfg=slice_of("regressions"),
        models=MODELS,
    script:
        "../scripts/regressions.py"


rule curves:
    """Training curves from the local metrics files (reward and val accuracy, loss/entropy, lengths)."""
    input:
        expand("results/runs/{run}/metrics.jsonl", run=RUNS),
    output:
        reward_val=report(
            "results/plots/reward_val.png",
            category="Training",
            caption="../report/curves_reward_val.rst",
        ),
        loss_entropy=report(
            "results/plots/loss_entropy.png",
            category="Training",
            caption="../report/curves_loss_entropy.rst",
        ),
        lengths=report(
            "results/plots/response_length.png",
            category="Training",
            caption="../report/curves_response_length.rst",
        ),
    log:
        "results/logs/curves.log",
    conda:
        "../envs/mathpt.yaml"
    params:
        runs=RUNS,
    script:
        "../scripts/curves.py"


rule summary:
    """results/summary.md: the run's report (commit, config, accuracy and CI tables, format and truncation
    rates, traces, wall times), rendered from the outputs only; the README copies its tables.
    """
    input:
        accuracy="results/accuracy.csv",
        ci="results/ci_table.csv",
        regressions="results/regressions.csv",
        eval_summaries=expand("results/eval/{model}/gsm8k_summary.json", model=MODELS),
        traces="results/traces/traces.summary.json",
        metrics=expand("results/runs/{run}/metrics.jsonl", run=RUNS),
        figures=[
            "results/plots/accuracy.png",
            "results/plots/forest.png",
            "results/plots/reward_val.png",
        ],
    output:
        summary=report(
            "results/summary.md", category="Results", caption="../report/summary.rst"
        ),
    log:
        "results/logs/summary.log",
    conda:
        "../envs/mathpt.yaml"
    params:
        cfg=canonical(config),
        models=MODELS,
        runs=RUNS,
        configfiles=[str(f) for f in workflow.configfiles],
    script:
        "../scripts/summary.py"
