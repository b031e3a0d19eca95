"""The result tables: paired CIs of accuracy differences (ci_table.csv), per-model accuracy
(accuracy.csv) and the lm-eval regression checks (regressions.csv).

Inputs are named runs: ``{model: {seed: path}}`` where model is "base" or an algorithm name and
seed is an int (None for an unseeded model such as base). Model names in file names follow
"base" / "{algo}-seed{seed}" (see parse_model_name / group_runs).

Seeds are paired by number (seed s of A with seed s of B: they share data order and, for PG
variants started from SFT, the SFT init); an unseeded model is paired with every seed of the
other. With two or more seeds the headline row of a comparison is the "pooled" row: a t-interval
that covers both training-seed and test-problem noise (``stats.seeds_problems_interval``); the
per-seed rows (paired bootstrap over problems) stay as labelled diagnostics (``family``
"diagnostic", no Holm). With one seed the single row is the headline and its ``ci_covers`` says that
between-seed variance is not covered. ``mde80`` is the smallest difference the design detects
with 80% power at two-sided 5% (from the row's SE and df); ``mde80_holm`` the same at the level
Holm's first step uses for the primary family (0.05 / its size).

Multiple comparisons: the primary comparisons are declared up front (``family`` "primary": each
policy-gradient variant vs SFT, and GRPO-clip vs REINFORCE with baseline); Holm's adjustment runs
over the primary headline rows. Every other comparison (vs base, other PG pairs) is
``exploratory`` and gets its own Holm over the exploratory headline rows. Headline rows with 0/1
scores and one seed are tested with exact McNemar, continuous ones with the bootstrap p, pooled
rows with the seeds x problems t (``p_method`` says which p was Holm-adjusted).

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
    "family",
    "mde80",
    "mde80_holm",
    "se_combined",
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
    "acc_kshot",
    "kshot_ci_low",
    "kshot_ci_high",
    "n_resamples",
    "n_seeds",
    "bootstrap_seed",
    "code_version",
    "task_versions",
]
# What each kind of interval covers, in words, for the ci_covers column.
COVERS_ONE_SEED = "test problems only: one training seed, so between-seed variance is NOT covered"
COVERS_SEEDS = "training seeds and test problems: two-way t (seeds x problems)"
COVERS_DIAGNOSTIC = "test problems (this seed only): a diagnostic, the pooled row is the interval to cite"
COVERS_UNSEEDED = "test problems (an untrained model: no training seed to vary)"
KSHOT_KEY = "kshot_correct"  # the secondary k-shot eval's grade in each eval row (gsm8k_eval)
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


PRIMARY_PAIRWISE = ("grpo_clip", "reinforce_with_baseline")  # pre-declared A - B, when both are trained


def primary_comparisons(models: Iterable[str]) -> list[tuple[str, str]]:
    """The pre-declared primary family among the models present: each policy-gradient variant
    (``mathpt.algorithms.PG_ALGOS``) vs SFT, and GRPO-clip vs REINFORCE with baseline."""
    present = set(models)
    pairs = [(a, "sft") for a in PG_ALGOS] + [PRIMARY_PAIRWISE]
    return [(a, b) for a, b in pairs if a in present and b in present]


def declared_comparisons(models: Iterable[str]) -> list[tuple[str, str]]:
    """Every comparison made, primary first, as (model_a, model_b) = A - B: the primary family, then
    (exploratory) each trained model vs base and the other PG variants pairwise."""
    present = set(models)
    primary = primary_comparisons(present)
    done = set(primary) | {(b, a) for a, b in primary}
    pairs = [(a, BASE) for a in ALGOS]
    pairs += [(PG_ALGOS[j], PG_ALGOS[i]) for i in range(len(PG_ALGOS)) for j in range(i + 1, len(PG_ALGOS))]
    return primary + [(a, b) for a, b in pairs if a in present and b in present and (a, b) not in done]


def family_of(a: str, b: str) -> str:
    """ "primary" for a pre-declared comparison (``primary_comparisons``), else "exploratory"."""
    return "primary" if (a, b) in primary_comparisons([a, b]) else "exploratory"


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


def _apply_holm(rows: list[dict], alpha: float = stats.ALPHA) -> None:
    """Holm within each family over its headline rows; diagnostic rows get none. Also mde80_holm."""
    p_key = {"mcnemar_exact": "mcnemar_p", "bootstrap": "boot_p", "seeds_problems_t": "t_p"}
    families: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["family"] != "diagnostic":
            families.setdefault(r["family"], []).append(r)
    for fam, group in families.items():
        for r, h in zip(group, stats.holm([r[p_key[r["p_method"]]] for r in group]), strict=True):
            r["holm_p"] = float(h)
            if fam == "primary":
                r["mde80_holm"] = stats.mde(r["_se"], r["_df"], alpha / len(group))
    for r in rows:
        r.pop("_se", None)
        r.pop("_df", None)


def _comparison_rows(
    runs: Runs,
    reader,
    comparisons: Sequence[tuple[str, str]],
    n_resamples: int,
    seed: int,
    alpha: float,
    family_of_fn=None,
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
        several = len(pairs) >= 2
        family = family_of(a, b) if family_of_fn is None else family_of_fn(a, b)
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
                    "ci_covers": COVERS_DIAGNOSTIC if several else COVERS_ONE_SEED,
                    "family": "diagnostic" if several else family,
                    "p_method": "mcnemar_exact" if binary else "bootstrap",
                    **r,
                    # problem-only normal test: its SE and df = inf
                    "mde80": stats.mde(r["se_paired"], math.inf, alpha),
                    "_se": r["se_paired"],
                    "_df": math.inf,
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
                    "p_method": "seeds_problems_t",
                    "ci_method": "seeds_x_problems_t",
                    "ci_covers": COVERS_SEEDS,
                    "family": family,
                    "n_resamples": None,
                    **r,
                    "mde80": stats.mde(r["se_combined"], r["ci_df"], alpha),
                    "_se": r["se_combined"],
                    "_df": r["ci_df"],
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


def _interval(x: np.ndarray, boot: np.ndarray, n: int, alpha: float) -> dict:
    """One run's accuracy CI: Wilson for 0/1 scores, else the bootstrap percentile."""
    if stats.is_binary(x):
        k = int(x.sum())
        lo, hi = stats.wilson_ci(k, n, alpha)
        return {"ci_low": lo, "ci_high": hi, "ci_method": "wilson", "n_correct": k}
    lo, hi = stats.percentile_ci(boot, alpha)
    return {"ci_low": lo, "ci_high": hi, "ci_method": "bootstrap_percentile", "n_correct": None}


def _kshot_scores(evals: Runs, keys: list) -> np.ndarray | None:
    """The secondary k-shot eval's (runs, n) 0/1 matrix, or None when the eval files have none."""
    first = evals[keys[0][0]][keys[0][1]]
    if not stats.has_eval_key(first, KSHOT_KEY):
        return None
    return stats.align({model_name(*k): stats.read_eval_scores(evals[k[0]][k[1]], KSHOT_KEY) for k in keys})


def build_accuracy_table(
    evals: Runs,
    out_csv: str | os.PathLike,
    meta: Mapping[str, Any],
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = stats.ALPHA,
) -> list[dict]:
    """Per-run accuracy of the primary eval with a 95% CI (Wilson for 0/1 scores, bootstrap
    percentile otherwise) and the eval rates (``eval_rates``); when the eval rows carry the secondary
    k-shot eval (``kshot_correct``), ``acc_kshot`` with its CI too. Plus a pooled row per model with
    two or more seeds: the mean over seeds and problems with the seeds x problems t-interval
    (``stats.seeds_problems_interval``) and mean rates."""
    cols = _meta_cols(meta, META_KEYS)
    keyed, matrix, keys = _load(evals, stats.read_eval_scores)
    kshot = _kshot_scores(evals, keys)
    boot = stats.bootstrap_means(matrix, n_resamples, seed)
    boot_k = stats.bootstrap_means(kshot, n_resamples, seed) if kshot is not None else None
    n = matrix.shape[1]
    rows = []
    common = {**cols, "n": n, "ci_level": 1 - alpha, "n_resamples": n_resamples, "bootstrap_seed": seed}
    for model in evals:
        idx = [i for i, k in enumerate(keys) if k[0] == model]
        covers = COVERS_DIAGNOSTIC if len(idx) >= 2 else COVERS_ONE_SEED
        rates = []
        for i in idx:
            s = keys[i][1]
            rates.append(eval_rates(evals[model][s]))
            sec = {}
            if kshot is not None:
                ci = _interval(kshot[i], boot_k[i], n, alpha)
                sec = {
                    "acc_kshot": float(kshot[i].mean()),
                    "kshot_ci_low": ci["ci_low"],
                    "kshot_ci_high": ci["ci_high"],
                }
            rows.append(
                {
                    **common,
                    "model": model,
                    "seed": "" if s is None else s,
                    "acc": float(matrix[i].mean()),
                    "n_seeds": 1,
                    **_interval(matrix[i], boot[i], n, alpha),
                    **rates[-1],
                    **sec,
                    "ci_covers": COVERS_UNSEEDED if s is None else covers,
                }
            )
        if len(idx) >= 2:
            t = stats.seeds_problems_interval(matrix[idx], alpha)
            mean_rates = {k: float(np.mean([r[k] for r in rates])) for k in rates[0]}
            sec = {}
            if kshot is not None:
                tk = stats.seeds_problems_interval(kshot[idx], alpha)
                sec = {"acc_kshot": tk["mean"], "kshot_ci_low": tk["ci_low"], "kshot_ci_high": tk["ci_high"]}
            rows.append(
                {
                    **common,
                    "model": model,
                    "seed": "pooled",
                    "acc": t["mean"],
                    "ci_low": t["ci_low"],
                    "ci_high": t["ci_high"],
                    "ci_df": t["df"],
                    "ci_method": "seeds_x_problems_t",
                    "ci_covers": COVERS_SEEDS,
                    "n_correct": None,
                    "n_seeds": len(idx),
                    "n_resamples": None,
                    **mean_rates,
                    **sec,
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
    keyed by task is taken per task. All rows are exploratory: Holm runs over every task x model
    headline row (pooled when there are several seeds).
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
        exploratory = lambda a, b: "exploratory"  # noqa: E731 - regression checks are not pre-declared
        for r in _comparison_rows(
            runs, stats.read_per_doc_scores, comps, n_resamples, seed, alpha, exploratory
        ):
            rows.append({**cols, "task": task, "metric": metric, **r})
    _apply_holm(rows)
    write_csv(rows, out_csv, REG_COLUMNS)
    return rows
