"""The result tables: paired CIs of accuracy differences (ci_table.csv), per-model accuracy
(accuracy.csv) and the lm-eval regression checks (regressions.csv).

Inputs are named runs: ``{model: {seed: path}}`` where model is "base" or an algorithm name and
seed is an int (None for an unseeded model such as base). Model names in file names follow
"base" / "{algo}-seed{seed}" (see parse_model_name / group_runs).

Seeds are paired by number (seed s of A with seed s of B: they share data order and, for PG
variants started from SFT, the SFT init); an unseeded model is paired with every seed of the
other. Each pairing gives a row whose interval is the paired bootstrap over test problems (it
knows nothing of training-seed variance). With two or more seeds a "pooled" row adds a
t-interval on the per-seed differences (df = n_seeds - 1, ``stats.compare_seeds``), the interval
to cite: it keeps its coverage when seeds disagree, which a bootstrap over 3 seeds does not. The
``ci_covers`` column says in words what each row's interval covers; with a single seed it says
that between-seed variance is not covered. Rows hold what was scored and its provenance, so a CSV
line is readable on its own.

Multiple comparisons: Holm's adjustment runs over the declared family *within each seed group*
(all rows with seed 0 form one family, seed 1 another, ..., the pooled rows another). Each seed
is a replicate of the whole experiment, so its family is the set of questions asked of that
replicate; pooling the seed rows into one family would count the same question several times.
Per-seed rows with 0/1 scores are tested with exact McNemar, continuous ones with the bootstrap p,
pooled rows with the t-test p (``p_method`` says which p was Holm-adjusted).

accuracy.csv also carries, per run, what the accuracy is made of (from the eval rows): the format
rate (the style's answer format was found), the accuracy ignoring format (the final answer is right
however it was written) and the truncated fraction (generation hit max_new_tokens).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mathpt import stats
from mathpt.algorithms import ALGOS, BASE, PG_ALGOS, model_name, parse_model_name
from mathpt.io import MathptError, atomic_write_text

META_KEYS = ("benchmark", "split", "scorer", "k_shot", "decoding", "code_version")

CI_COLUMNS = [
    "benchmark",
    "split",
    "n",
    "scorer",
    "k_shot",
    "decoding",
    "model_a",
    "model_b",
    "seed",
    "acc_a",
    "acc_b",
    "diff",
    "ci_low",
    "ci_high",
    "ci_level",
    "ci_method",
    "ci_df",
    "ci_covers",
    "se_paired",
    "se_boot",
    "se_seeds",
    "corr",
    "both_right",
    "only_a",
    "only_b",
    "both_wrong",
    "mcnemar_p",
    "boot_p",
    "t_p",
    "p_method",
    "holm_p",
    "n_resamples",
    "n_seeds",
    "bootstrap_seed",
    "code_version",
    "task_versions",
]
ACC_COLUMNS = [
    "benchmark",
    "split",
    "n",
    "scorer",
    "k_shot",
    "decoding",
    "model",
    "seed",
    "acc",
    "ci_low",
    "ci_high",
    "ci_level",
    "ci_method",
    "ci_df",
    "ci_covers",
    "n_correct",
    "acc_any_format",
    "format_rate",
    "truncated_fraction",
    "mean_generated_tokens",
    "n_resamples",
    "n_seeds",
    "bootstrap_seed",
    "code_version",
    "task_versions",
]
# What each kind of interval covers, in words, for the ci_covers column.
COVERS_PROBLEMS = "test problems (this seed only)"
COVERS_ONE_SEED = "test problems only: one training seed, so between-seed variance is NOT covered"
COVERS_SEEDS = "training seeds: t over per-seed values, on these test problems"
COVERS_UNSEEDED = "test problems (an untrained model: no training seed to vary)"
REG_COLUMNS = ["task", "metric"] + [c for c in CI_COLUMNS if c not in ("benchmark", "scorer")]

Runs = Mapping[str, Mapping[int | None, Any]]


# ----------------------------------------------------------------------------- naming


def group_runs(named: Mapping[str, Any]) -> dict[str, dict[int | None, Any]]:
    """{"base": p, "sft-seed0": q, ...} -> {"base": {None: p}, "sft": {0: q}, ...}."""
    out: dict[str, dict[int | None, Any]] = {}
    for name, value in named.items():
        algo, seed = parse_model_name(name)
        if seed in out.setdefault(algo, {}):
            raise MathptError(f"run {name!r} given twice")
        out[algo][seed] = value
    return out


def declared_comparisons(models: Iterable[str]) -> list[tuple[str, str]]:
    """The declared family, restricted to the models present, as (model_a, model_b) = A - B:
    each trained model vs base, each PG variant vs SFT, and the PG variants pairwise."""
    present = set(models)
    pairs = [(a, BASE) for a in ALGOS]
    pairs += [(a, "sft") for a in PG_ALGOS]
    pairs += [(PG_ALGOS[j], PG_ALGOS[i]) for i in range(len(PG_ALGOS)) for j in range(i + 1, len(PG_ALGOS))]
    return [(a, b) for a, b in pairs if a in present and b in present]


# ----------------------------------------------------------------------------- CSV


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float | np.floating):
        return "" if not math.isfinite(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, sort_keys=True)
    return v


def write_csv(rows: Sequence[Mapping[str, Any]], out_csv: str | os.PathLike, columns: Sequence[str]) -> None:
    """Write rows atomically; NaN/None become empty cells, dicts become JSON, extra keys trail."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns) + extra, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    atomic_write_text(out_csv, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- helpers


def _meta_cols(meta: Mapping[str, Any], keys: Sequence[str], task: str | None = None) -> dict[str, Any]:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise MathptError(f"stats meta lacks key(s) {missing} (needed to say what was scored)")
    out = {}
    for k, v in meta.items():
        # A dict keyed by task (e.g. k_shot or task_versions for the lm-eval suite) gives that task's value.
        if task is not None and isinstance(v, Mapping) and task in v:
            v = v[task]
        out[k] = v
    out.setdefault("task_versions", "")
    return out


def _load(runs: Runs, reader) -> tuple[dict[tuple[str, int | None], stats.RunScores], np.ndarray, list]:
    if not runs:
        raise MathptError("no eval files given")
    keyed = {}
    for model, seeds in runs.items():
        if not seeds:
            raise MathptError(f"model {model!r} has no eval files")
        for seed, path in seeds.items():
            keyed[(model, seed)] = reader(path)
    keys = list(keyed)
    matrix = stats.align({model_name(*k): keyed[k] for k in keys})
    return keyed, matrix, keys


def _pairings(runs: Runs, a: str, b: str) -> list[tuple[int | None, int | None]]:
    sa, sb = list(runs[a]), list(runs[b])
    a_un, b_un = sa == [None], sb == [None]
    if None in sa and not a_un or None in sb and not b_un:
        raise MathptError(f"a model mixes seeded and unseeded runs: {a}: {sa}, {b}: {sb}")
    if a_un and b_un:
        return [(None, None)]
    if a_un:
        return [(None, s) for s in sorted(sb)]
    if b_un:
        return [(s, None) for s in sorted(sa)]
    if set(sa) != set(sb):
        raise MathptError(
            f"{a} has seeds {sorted(sa)} but {b} has seeds {sorted(sb)}: seeds are paired by number"
        )
    return [(s, s) for s in sorted(sa)]


def _apply_holm(rows: list[dict]) -> None:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["seed"]), []).append(r)
    p_key = {"mcnemar_exact": "mcnemar_p", "bootstrap": "boot_p", "t_seeds": "t_p"}
    for group in groups.values():
        p = [r[p_key[r["p_method"]]] for r in group]
        for r, h in zip(group, stats.holm(p), strict=True):
            r["holm_p"] = float(h)


def _comparison_rows(
    runs: Runs, reader, comparisons: Sequence[tuple[str, str]], n_resamples: int, seed: int, alpha: float
) -> list[dict]:
    """Rows without meta columns or Holm: one per seed pairing (+ pooled) per comparison."""
    for a, b in comparisons:
        for m in (a, b):
            if m not in runs:
                raise MathptError(f"comparison {a} - {b}: no eval files for {m!r} (have {sorted(runs)})")
    keyed, matrix, keys = _load(runs, reader)
    pos = {k: i for i, k in enumerate(keys)}
    boot = stats.bootstrap_means(matrix, n_resamples, seed)
    rows = []
    for a, b in comparisons:
        pairs = _pairings(runs, a, b)
        base = {
            "model_a": a,
            "model_b": b,
            "n": matrix.shape[1],
            "ci_level": 1 - alpha,
            "ci_method": "paired_bootstrap_percentile",
            "n_resamples": n_resamples,
            "bootstrap_seed": seed,
        }
        covers = COVERS_PROBLEMS if len(pairs) >= 2 else COVERS_ONE_SEED
        for sa, sb in pairs:
            ia, ib = pos[(a, sa)], pos[(b, sb)]
            r = stats.compare_single(matrix[ia], matrix[ib], boot[ia], boot[ib], alpha)
            binary = stats.is_binary(matrix[ia]) and stats.is_binary(matrix[ib])
            s = sa if sa is not None else sb
            rows.append(
                {
                    **base,
                    "seed": "" if s is None else s,
                    "n_seeds": 1,
                    "ci_covers": covers,
                    "p_method": "mcnemar_exact" if binary else "bootstrap",
                    **r,
                }
            )
        if len(pairs) >= 2:
            ia = [pos[(a, sa)] for sa, _ in pairs]
            ib = [pos[(b, sb)] for _, sb in pairs]
            r = stats.compare_seeds(matrix[ia], matrix[ib], alpha)
            rows.append(
                {
                    **base,
                    "seed": "pooled",
                    "n_seeds": len(pairs),
                    "p_method": "t_seeds",
                    "ci_method": "t_over_seeds",
                    "ci_covers": COVERS_SEEDS,
                    "n_resamples": None,
                    **r,
                }
            )
    return rows


# ----------------------------------------------------------------------------- public tables


def build_ci_table(
    evals: Runs,
    out_csv: str | os.PathLike,
    meta: Mapping[str, Any],
    n_resamples: int = 10_000,
    seed: int = 0,
    comparisons: Sequence[tuple[str, str]] | None = None,
    alpha: float = stats.ALPHA,
) -> list[dict]:
    """Paired comparisons of eval files -> ``out_csv`` (see the module docstring for pairing/Holm).

    evals: {model: {seed: eval jsonl}} ("base": {None: path}); meta: benchmark, split, scorer,
    k_shot, decoding, code_version (required), task_versions and any extra keys (extra columns).
    comparisons: (model_a, model_b) pairs, diff = A - B; default declared_comparisons(evals).
    Returns the rows written.
    """
    cols = _meta_cols(meta, META_KEYS)
    comparisons = declared_comparisons(evals) if comparisons is None else list(comparisons)
    if not comparisons:
        raise MathptError(f"no comparisons to make among models {sorted(evals)}")
    rows = _comparison_rows(evals, stats.read_eval_scores, comparisons, n_resamples, seed, alpha)
    rows = [{**cols, **r} for r in rows]
    _apply_holm(rows)
    write_csv(rows, out_csv, CI_COLUMNS)
    return rows


RATE_KEYS = {
    "formatted": "format_rate",
    "correct_any_format": "acc_any_format",
    "truncated": "truncated_fraction",
}


def eval_rates(path: str | os.PathLike) -> dict[str, float]:
    """Format rate, accuracy ignoring format, truncated fraction and mean length of one eval file."""
    from mathpt.io import DataError, iter_jsonl_numbered

    sums = dict.fromkeys([*RATE_KEYS, "generated_tokens"], 0.0)
    n = 0
    for lineno, row in iter_jsonl_numbered(path):
        missing = [k for k in sums if k not in row]
        if missing:
            raise DataError(
                f"{path}:{lineno}: eval row lacks {missing} (written by an older mathpt; rerun the eval)"
            )
        for k in sums:
            v = row[k]
            if k == "generated_tokens" and (isinstance(v, bool) or not isinstance(v, int)):
                raise DataError(f"{path}:{lineno}: 'generated_tokens' must be an integer, got {v!r}")
            if k != "generated_tokens" and not isinstance(v, bool):
                raise DataError(f"{path}:{lineno}: {k!r} must be true or false, got {v!r}")
            sums[k] += float(v)
        n += 1
    if not n:
        raise DataError(f"{path}: no rows")
    out = {RATE_KEYS[k]: sums[k] / n for k in RATE_KEYS}
    out["mean_generated_tokens"] = sums["generated_tokens"] / n
    return out


def build_accuracy_table(
    evals: Runs,
    out_csv: str | os.PathLike,
    meta: Mapping[str, Any],
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = stats.ALPHA,
) -> list[dict]:
    """Per-run accuracy with a 95% CI (Wilson for 0/1 scores, bootstrap percentile otherwise) and
    the eval rates (``eval_rates``), plus a pooled row per model with two or more seeds: the mean
    over seeds with a t-interval over the per-seed accuracies (df = n_seeds - 1) and mean rates."""
    cols = _meta_cols(meta, META_KEYS)
    keyed, matrix, keys = _load(evals, stats.read_eval_scores)
    boot = stats.bootstrap_means(matrix, n_resamples, seed)
    n = matrix.shape[1]
    rows = []
    common = {**cols, "n": n, "ci_level": 1 - alpha, "n_resamples": n_resamples, "bootstrap_seed": seed}
    for model in evals:
        idx = [i for i, k in enumerate(keys) if k[0] == model]
        covers = COVERS_PROBLEMS if len(idx) >= 2 else COVERS_ONE_SEED
        rates = []
        for i in idx:
            x = matrix[i]
            s = keys[i][1]
            rates.append(eval_rates(evals[model][s]))
            if stats.is_binary(x):
                k = int(x.sum())
                lo, hi = stats.wilson_ci(k, n, alpha)
                extra = {"ci_method": "wilson", "n_correct": k}
            else:
                lo, hi = stats.percentile_ci(boot[i], alpha)
                extra = {"ci_method": "bootstrap_percentile", "n_correct": None}
            rows.append(
                {
                    **common,
                    "model": model,
                    "seed": "" if s is None else s,
                    "acc": float(x.mean()),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_seeds": 1,
                    **extra,
                    **rates[-1],
                    "ci_covers": COVERS_UNSEEDED if s is None else covers,
                }
            )
        if len(idx) >= 2:
            t = stats.seed_t_interval(matrix[idx].mean(1), alpha)
            mean_rates = {k: float(np.mean([r[k] for r in rates])) for k in rates[0]}
            rows.append(
                {
                    **common,
                    "model": model,
                    "seed": "pooled",
                    "acc": t["mean"],
                    "ci_low": t["ci_low"],
                    "ci_high": t["ci_high"],
                    "ci_df": t["df"],
                    "ci_method": "t_over_seeds",
                    "ci_covers": COVERS_SEEDS,
                    "n_correct": None,
                    "n_seeds": len(idx),
                    "n_resamples": None,
                    **mean_rates,
                }
            )
    write_csv(rows, out_csv, ACC_COLUMNS)
    return rows


def build_regressions_table(
    per_doc: Mapping[str, Mapping[int | None, Mapping[str, Any]]],
    out_csv: str | os.PathLike,
    meta: Mapping[str, Any],
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = stats.ALPHA,
) -> list[dict]:
    """lm-eval regression checks: each trained model vs base, per task, from per-doc score files.

    per_doc: {model: {seed: {task: per-doc jsonl}}} with rows {"doc_id", "score", "metric"}.
    meta: split, k_shot, decoding, code_version (required), task_versions; a value that is a dict
    keyed by task is taken per task. Holm runs over all tasks x models within each seed group.
    diff = model - base in the metric's own direction (for perplexity, lower is better).
    """
    if BASE not in per_doc:
        raise MathptError(f"regressions need the {BASE!r} model; have {sorted(per_doc)}")
    tasks = sorted({t for seeds in per_doc.values() for tasks in seeds.values() for t in tasks})
    rows = []
    for task in tasks:
        runs = {}
        for model, seeds in per_doc.items():
            for s, by_task in seeds.items():
                if task not in by_task:
                    raise MathptError(f"{model_name(model, s)} has no per-doc file for task {task!r}")
                runs.setdefault(model, {})[s] = by_task[task]
        comps = [(m, BASE) for m in per_doc if m != BASE]
        cols = _meta_cols(meta, ("split", "k_shot", "decoding", "code_version"), task=task)
        metric = stats.read_per_doc_scores(runs[BASE][next(iter(runs[BASE]))]).metric
        for r in _comparison_rows(runs, stats.read_per_doc_scores, comps, n_resamples, seed, alpha):
            rows.append({**cols, "task": task, "metric": metric, **r})
    _apply_holm(rows)
    write_csv(rows, out_csv, REG_COLUMNS)
    return rows
