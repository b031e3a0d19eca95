"""Paired statistics for "did algorithm A beat B on the same problems?".

Every model is scored on the same problems, so comparisons are paired. Within one training seed the
bootstrap resamples *problems* and applies the same resample to every model (one index matrix per
table), which keeps the problem-difficulty correlation between models and gives much tighter
intervals than two independent CIs; exact McNemar tests the same 0/1 pairs.

Across training seeds the headline interval must cover two sources of noise at once: which test
problems were drawn and which training seeds were run. ``seeds_problems_interval`` treats the S x n
matrix of per-problem differences D[s, i] as a two-way crossed random-effects layout,
D = mu + seed_s + problem_i + residual_si, and estimates Var(mean D) = var_seed / S + var_problem / n
+ var_resid / (n S) from the ANOVA mean squares (MS_seed, df S - 1; MS_problem, df n - 1; MS_resid),
a t-interval with Satterthwaite-type df. A bootstrap over 3-5 seeds under-covers badly (about 20%
false positives at nominal 5%); a t over the S per-seed differences alone is conditional on these
test problems (up to 25% false positives when the two models are good at different problems).
The coverage simulation in tests/stats/test_stats.py checks the combined interval. With one seed there
is no between-seed interval at all: the per-seed rows say so (``ci_table``).

Scores are float arrays: 0/1 for correctness (McNemar and agreement counts apply) or any real
per-problem metric (lm-eval per-doc ``acc``, ``word_perplexity``; only the bootstrap and the
analytic SE apply).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathpt.io import DataError, MathptError, iter_jsonl_numbered

ALPHA = 0.05
# Bootstrap indices are drawn in blocks of about this many elements, so memory stays bounded
# (10,000 resamples x 10,042 hellaswag docs would be 800 MB at once). The block size is a fixed
# function of n, so a (seed, n, n_resamples) triple always gives the same indices.
_BLOCK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------- reading scores


@dataclass(frozen=True)
class RunScores:
    """Per-problem scores of one model run, sorted by problem index."""

    path: str
    index: np.ndarray  # int64, ascending, unique
    score: np.ndarray  # float64, aligned with index
    gold: tuple[str, ...] | None = None  # eval files only: checked equal across models
    metric: str | None = None  # per-doc files only

    @property
    def binary(self) -> bool:
        return is_binary(self.score)


def is_binary(x: np.ndarray) -> bool:
    x = np.asarray(x)
    return bool(np.all((x == 0) | (x == 1)))


def _read_scores(path: str | os.PathLike, id_key: str, kind: str, key: str = "correct") -> RunScores:
    path = Path(path)
    seen: dict[int, int] = {}
    idx, scores, golds, metrics = [], [], [], set()
    for lineno, row in iter_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        need = (id_key, "gold", key) if kind == "eval" else (id_key, "score", "metric")
        missing = [k for k in need if k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        i = row[id_key]
        if not isinstance(i, int) or isinstance(i, bool):
            raise DataError(f"{where}: {id_key!r} must be an integer, got {i!r}")
        if i in seen:
            raise DataError(f"{where}: duplicate {id_key} {i} (first on line {seen[i]})")
        seen[i] = lineno
        if kind == "eval":
            c = row[key]
            if not isinstance(c, bool):
                raise DataError(f"{where}: {key!r} must be true or false, got {c!r}")
            scores.append(float(c))
            golds.append(str(row["gold"]))
        else:
            s = row["score"]
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise DataError(f"{where}: 'score' must be a finite number, got {s!r}")
            scores.append(float(s))
            metrics.add(str(row["metric"]))
        idx.append(i)
    if not idx:
        raise DataError(f"{path}: no rows")
    if len(metrics) > 1:
        raise DataError(f"{path}: mixed metrics {sorted(metrics)}; one metric per per-doc file")
    order = np.argsort(idx, kind="stable")
    return RunScores(
        path=str(path),
        index=np.asarray(idx, dtype=np.int64)[order],
        score=np.asarray(scores, dtype=np.float64)[order],
        gold=tuple(golds[k] for k in order) if kind == "eval" else None,
        metric=metrics.pop() if metrics else None,
    )


def read_eval_scores(path: str | os.PathLike, key: str = "correct") -> RunScores:
    """Read an eval jsonl (rows with ``index``, ``gold``, ``correct``); score = ``key`` as 0/1
    (``correct``: the primary eval; ``kshot_correct``: the secondary k-shot eval)."""
    return _read_scores(path, "index", "eval", key)


def has_eval_key(path: str | os.PathLike, key: str) -> bool:
    """Whether the first row of an eval jsonl has ``key``."""
    for _, row in iter_jsonl_numbered(Path(path)):
        return key in row
    return False


def read_per_doc_scores(path: str | os.PathLike) -> RunScores:
    """Read an lm-eval per-doc jsonl (rows ``{"doc_id": int, "score": float, "metric": str}``)."""
    return _read_scores(path, "doc_id", "per_doc")


def align(runs: Mapping[str, RunScores]) -> np.ndarray:
    """Stack runs into an (m, n) score matrix after checking they cover the same problems.

    Every run must have the same set of indices, the same gold answer per index (eval files) and
    the same metric (per-doc files); otherwise MathptError names both files and examples.
    """
    if not runs:
        raise MathptError("no runs to compare")
    names = list(runs)
    ref_name, ref = names[0], runs[names[0]]
    for name in names[1:]:
        r = runs[name]
        if not np.array_equal(r.index, ref.index):
            extra = np.setdiff1d(r.index, ref.index)[:5].tolist()
            lacks = np.setdiff1d(ref.index, r.index)[:5].tolist()
            raise MathptError(
                f"{name} ({r.path}) and {ref_name} ({ref.path}) scored different problems: "
                f"{len(r.index)} vs {len(ref.index)} rows; only in {name}: {extra}, only in {ref_name}: {lacks}"
            )
        if ref.gold is not None and r.gold is not None and r.gold != ref.gold:
            k = next(k for k, (g1, g2) in enumerate(zip(ref.gold, r.gold, strict=True)) if g1 != g2)
            raise MathptError(
                f"gold answers differ at index {int(ref.index[k])}: {ref_name} ({ref.path}) has "
                f"{ref.gold[k]!r}, {name} ({r.path}) has {r.gold[k]!r}"
            )
        if ref.metric != r.metric:
            raise MathptError(
                f"metrics differ: {ref_name} ({ref.path}) has {ref.metric!r}, {name} ({r.path}) has {r.metric!r}"
            )
    return np.stack([runs[n].score for n in names])


# ----------------------------------------------------------------------------- bootstrap


def _block_rows(n: int) -> int:
    return max(1, _BLOCK_ELEMS // max(n, 1))


def bootstrap_index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield the problem-resample index matrix in row blocks of shape (rows, n).

    Deterministic in (n, n_resamples, seed); the problem stream is ``default_rng([seed, 0])``.
    """
    if n < 1 or n_resamples < 2 or seed < 0:
        raise MathptError(
            f"bootstrap needs n >= 1, n_resamples >= 2 and seed >= 0; got n={n}, "
            f"n_resamples={n_resamples}, seed={seed}"
        )
    rng = np.random.default_rng([seed, 0])
    rows = _block_rows(n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n), dtype=np.int64)


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """The full (n_resamples, n) index matrix (the same one bootstrap_means uses)."""
    return np.concatenate(list(bootstrap_index_blocks(n, n_resamples, seed)))


def bootstrap_means(scores: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Bootstrap means of each row of ``scores`` (m, n) under one shared problem resample: (m, R).

    scipy.stats.bootstrap cannot share resample indices across calls (every model must see the
    same resampled problems for the differences to be paired), so this is hand-written: each index block becomes a count matrix
    (how often each problem was drawn) and one matmul gives the means of all models at once.
    10,000 x 1,319 takes well under a second; with 0/1 scores the sums are exact.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = scores.shape
    out = np.empty((m, n_resamples))
    r0 = 0
    for idx in bootstrap_index_blocks(n, n_resamples, seed):
        b = idx.shape[0]
        flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        out[:, r0 : r0 + b] = (scores @ counts.T) / n
        r0 += b
    return out


def percentile_ci(boot: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_p(boot_diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "difference = 0": twice the smaller tail mass at 0.

    Uses the (k + 1) / (R + 1) correction so it is never exactly 0; it agrees with the percentile
    interval (p < alpha roughly iff the interval excludes 0). Resolution is about 2 / R.
    """
    d = np.asarray(boot_diffs)
    k = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return float(min(1.0, 2 * (k + 1) / (d.size + 1)))


# ----------------------------------------------------------------------------- analytic pieces


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Analytic SE of mean(a - b) for paired scores: sd(a - b, ddof=1) / sqrt(n).

    Equals sqrt((var_a + var_b - 2 cov_ab) / n); NaN for n < 2.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return float("nan")
    return float(np.std(d, ddof=1) / math.sqrt(d.size))


def seed_t_arrays(x: np.ndarray, alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """``seed_t_interval`` over the last axis of ``x`` (..., S), vectorized (used by simulations)."""
    from scipy.stats import t as student_t

    x = np.asarray(x, dtype=np.float64)
    s = x.shape[-1]
    if s < 2:
        raise MathptError(f"a between-seed interval needs at least 2 seeds, got {s}")
    mean = x.mean(-1)
    se = x.std(-1, ddof=1) / math.sqrt(s)
    df = s - 1
    q = float(student_t.ppf(1 - alpha / 2, df))
    # Identical per-seed values: a zero-width interval at 0 (identical models) is exact; anywhere
    # else the spread is simply unobserved, so the interval and p are undefined (NaN), not certain.
    undefined = (se == 0) & (mean != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(se > 0, 2 * student_t.sf(np.abs(mean) / se, df), np.where(undefined, np.nan, 1.0))
    lo = np.where(undefined, np.nan, mean - q * se)
    hi = np.where(undefined, np.nan, mean + q * se)
    return {"mean": mean, "se": se, "df": df, "ci_low": lo, "ci_high": hi, "p": p}


def seed_t_interval(x: np.ndarray, alpha: float = ALPHA) -> dict:
    """Student-t interval and two-sided p for the mean of S per-seed values (S >= 2, df = S - 1).

    ``x`` holds one number per training seed (an accuracy, or a paired difference A - B). Returns
    mean, se = sd(x, ddof=1) / sqrt(S), df, ci_low, ci_high and p (one-sample t-test of mean = 0).
    Identical values give a zero-width interval and p = 1 if the mean is 0; identical non-zero
    values (two seeds at the same accuracy) give NaN: their spread was not observed, not zero.
    """
    r = seed_t_arrays(np.asarray(x, dtype=np.float64).ravel(), alpha)
    return {k: (v if k == "df" else float(v)) for k, v in r.items()}


def seeds_problems_arrays(d: np.ndarray, alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """``seeds_problems_interval`` over the last two axes of ``d`` (..., S, n), vectorized."""
    from scipy.stats import t as student_t

    d = np.asarray(d, dtype=np.float64)
    s_, n = d.shape[-2:]
    if s_ < 2 or n < 2:
        raise MathptError(f"a seeds x problems interval needs at least 2 seeds and 2 problems, got {d.shape}")
    mean = d.mean((-2, -1))
    by_seed, by_problem = d.mean(-1), d.mean(-2)
    f_s, f_p, f_r = s_ - 1, n - 1, (s_ - 1) * (n - 1)
    ms_s = n * ((by_seed - mean[..., None]) ** 2).sum(-1) / f_s
    ms_p = s_ * ((by_problem - mean[..., None]) ** 2).sum(-1) / f_p
    resid = d - by_seed[..., None] - by_problem[..., None, :] + mean[..., None, None]
    ms_r = (resid**2).sum((-2, -1)) / f_r
    # E[MS_seed] = n var_seed + var_resid and E[MS_problem - MS_resid] = S var_problem, so
    # (MS_seed + max(MS_problem - MS_resid, 0)) / (n S) estimates Var(mean); the clamp keeps var_problem >= 0.
    has_p = ms_p > ms_r
    v = (ms_s + np.where(has_p, ms_p - ms_r, 0.0)) / (n * s_)
    # Satterthwaite df with MS_seed's term inflated by (f + 2) / f (its few df make the plain formula
    # liberal, up to 8% at nominal 5% with 3 seeds), floored at S - 1: without problem variance the
    # statistic is exactly the t over per-seed differences (df S - 1).
    den = ms_s**2 * (f_s + 2) / f_s**2 + np.where(has_p, ms_p**2 / f_p + ms_r**2 / f_r, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(den > 0, np.maximum(f_s, (v * n * s_) ** 2 / den), float(f_s))
        se = np.sqrt(v)
        q = student_t.ppf(1 - alpha / 2, df)
        undefined = (se == 0) & (mean != 0)  # no spread observed anywhere: unknown, not certain
        p = np.where(se > 0, 2 * student_t.sf(np.abs(mean) / se, df), np.where(undefined, np.nan, 1.0))
    lo = np.where(undefined, np.nan, mean - q * se)
    hi = np.where(undefined, np.nan, mean + q * se)
    return {
        "mean": mean,
        "se": se,
        "df": df,
        "ci_low": lo,
        "ci_high": hi,
        "p": p,
        "se_seeds": np.sqrt(ms_s / (n * s_)),
        "ms_seed": ms_s,
        "ms_problem": ms_p,
        "ms_resid": ms_r,
    }


def seeds_problems_interval(d: np.ndarray, alpha: float = ALPHA) -> dict:
    """t-interval and two-sided p for the mean of an (S, n) matrix that covers seed AND problem noise.

    ``d`` holds one row per training seed and one column per test problem: paired differences A - B
    (or one model's scores). Returns mean, se, df (Satterthwaite-type, >= S - 1), ci_low, ci_high, p,
    se_seeds (the t-over-seeds SE, conditional on these problems) and the three mean squares; see the
    module docstring and README ("ci_table.csv") for the formula. Needs S >= 2.
    """
    r = seeds_problems_arrays(d, alpha)
    return {k: float(v) for k, v in r.items()}


def mde(se: float, df: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest true difference a two-sided level-``alpha`` t-test with this SE and df detects with
    probability ``power``: the noncentrality delta with P(|T| > t_crit) = power, T ~ nct(df, delta),
    times se (df = inf: the normal test, (z_{1-alpha/2} + z_power) se). NaN for a NaN or zero SE."""
    from scipy.optimize import brentq
    from scipy.stats import nct, norm
    from scipy.stats import t as student_t

    if not (math.isfinite(se) and se > 0) or not df > 0:
        return float("nan")
    if not math.isfinite(df):
        crit = float(norm.ppf(1 - alpha / 2))

        def pw(delta: float) -> float:
            return float(norm.sf(crit - delta) + norm.cdf(-crit - delta))
    else:
        crit = float(student_t.ppf(1 - alpha / 2, df))

        def pw(delta: float) -> float:
            # P(T < -crit | delta) = P(T > crit | -delta); the far tail is NaN in scipy for large delta
            far = float(nct.sf(crit, df, -delta))
            return float(nct.sf(crit, df, delta)) + (far if math.isfinite(far) else 0.0)

    hi = crit + 10.0
    while pw(hi) < power:
        hi *= 2
    return float(brentq(lambda x: pw(x) - power, 0.0, hi, xtol=1e-10)) * se


def paired_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of per-problem scores (phi for 0/1); NaN if either is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def agreement_counts(a: np.ndarray, b: np.ndarray) -> dict[str, int]:
    """2x2 agreement table of two 0/1 score vectors."""
    a = np.asarray(a) == 1
    b = np.asarray(b) == 1
    return {
        "both_right": int(np.sum(a & b)),
        "only_a": int(np.sum(a & ~b)),
        "only_b": int(np.sum(~a & b)),
        "both_wrong": int(np.sum(~a & ~b)),
    }


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact McNemar p: two-sided binomial test of only_a out of the discordant pairs at 1/2."""
    from scipy.stats import binomtest

    n = int(only_a) + int(only_b)
    if n == 0:
        return 1.0  # no discordant pairs: no evidence of a difference
    return float(binomtest(int(only_a), n, 0.5, alternative="two-sided").pvalue)


def holm(pvals) -> np.ndarray:
    """Holm step-down adjusted p-values (statsmodels); NaN entries stay NaN and are not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvals, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def wilson_ci(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (statsmodels)."""
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(int(k), int(n), alpha=alpha, method="wilson")
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- comparisons


def _nan_counts() -> dict:
    return {"both_right": None, "only_a": None, "only_b": None, "both_wrong": None}


def compare_single(
    a: np.ndarray, b: np.ndarray, boot_a: np.ndarray, boot_b: np.ndarray, alpha: float = ALPHA
) -> dict:
    """Statistics of A - B for one pair of runs, given their shared-index bootstrap means."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    boot = np.asarray(boot_a) - np.asarray(boot_b)
    binary = is_binary(a) and is_binary(b)
    counts = agreement_counts(a, b) if binary else _nan_counts()
    lo, hi = percentile_ci(boot, alpha)
    return {
        "acc_a": float(a.mean()),
        "acc_b": float(b.mean()),
        "diff": float(a.mean() - b.mean()),
        "ci_low": lo,
        "ci_high": hi,
        "se_paired": paired_se(a, b),
        "se_boot": float(np.std(boot, ddof=1)),
        "corr": paired_corr(a, b),
        **counts,
        "mcnemar_p": mcnemar_exact_p(counts["only_a"], counts["only_b"]) if binary else float("nan"),
        "boot_p": bootstrap_p(boot),
    }


def compare_seeds(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> dict:
    """Statistics of A - B over S paired training seeds and n shared test problems.

    ``a``/``b`` are (S, n) scores, seed s of A paired with seed s of B (an unseeded model such as
    base is repeated S times). diff is the mean of the per-problem differences; ci_low/ci_high, ci_df,
    se_combined and t_p come from ``seeds_problems_interval`` (both seed and problem noise);
    se_seeds is the t-over-seeds SE (conditional on these problems) and se_paired the analytic
    problem-only SE of the seed-averaged scores, for comparison. Agreement counts are summed over
    seeds. McNemar and the problem bootstrap do not apply to pooled seeds (NaN).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise MathptError(f"compare_seeds: score matrices differ in shape, {a.shape} vs {b.shape}")
    t = seeds_problems_interval(a - b, alpha)
    if is_binary(a) and is_binary(b):
        per_seed = [agreement_counts(x, y) for x, y in zip(a, b, strict=True)]
        counts = {k: sum(c[k] for c in per_seed) for k in per_seed[0]}
    else:
        counts = _nan_counts()
    ma, mb = a.mean(0), b.mean(0)
    return {
        "acc_a": float(a.mean()),
        "acc_b": float(b.mean()),
        "diff": t["mean"],
        "ci_low": t["ci_low"],
        "ci_high": t["ci_high"],
        "ci_df": t["df"],
        "se_combined": t["se"],
        "se_seeds": t["se_seeds"],
        "se_paired": paired_se(ma, mb),
        "se_boot": float("nan"),
        "corr": paired_corr(ma, mb),
        **counts,
        "mcnemar_p": float("nan"),
        "boot_p": float("nan"),
        "t_p": t["p"],
    }


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_resamples: int = 10_000, seed: int = 0, alpha: float = ALPHA
) -> dict:
    """One-call paired comparison of two (n,) score vectors (see compare_single)."""
    boot = bootstrap_means(np.stack([a, b]), n_resamples, seed)
    return compare_single(a, b, boot[0], boot[1], alpha)
