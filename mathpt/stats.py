"""Paired statistics for "did algorithm A beat B on the same problems?".

Every model is scored on the same problems, so comparisons are paired: the bootstrap resamples
*problems* and applies the same resample to every model (one index matrix per table), which keeps
the problem-difficulty correlation between models and gives much tighter intervals than two
independent CIs. With several training seeds the pooled bootstrap is hierarchical (resample seeds,
then problems) so that training noise shows in the interval, not only test-set noise.

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


def _read_scores(path: str | os.PathLike, id_key: str, kind: str) -> RunScores:
    path = Path(path)
    seen: dict[int, int] = {}
    idx, scores, golds, metrics = [], [], [], set()
    for lineno, row in iter_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        need = (id_key, "gold", "correct") if kind == "eval" else (id_key, "score", "metric")
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
            c = row["correct"]
            if not isinstance(c, bool):
                raise DataError(f"{where}: 'correct' must be true or false, got {c!r}")
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


def read_eval_scores(path: str | os.PathLike) -> RunScores:
    """Read an eval jsonl (rows with ``index``, ``gold``, ``correct``); score = correct as 0/1."""
    return _read_scores(path, "index", "eval")


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

    Deterministic in (n, n_resamples, seed); the problem stream is ``default_rng([seed, 0])``,
    independent of the seed-resample stream ``[seed, 1]``.
    """
    if n < 1 or n_resamples < 2 or seed < 0:
        raise MathptError(f"bootstrap needs n >= 1, n_resamples >= 2 and seed >= 0; got n={n}, "
                          f"n_resamples={n_resamples}, seed={seed}")
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
    same resampled problems for the differences to be paired, and the hierarchical pooled
    bootstrap reuses them), so this is hand-written: each index block becomes a count matrix
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


def seed_resample_weights(n_seeds: int, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """(R, S) weights: row r = how often each training seed is drawn in resample r, divided by S."""
    rng = np.random.default_rng([seed, 1])
    picks = rng.integers(0, n_seeds, size=(n_resamples, n_seeds), dtype=np.int64)
    flat = (picks + (np.arange(n_resamples, dtype=np.int64) * n_seeds)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n_seeds).reshape(n_resamples, n_seeds)
    return counts / n_seeds


def hierarchical_boot(boot_a: np.ndarray, boot_b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pooled bootstrap differences: resample seeds (``weights``, (R, S)), then problems.

    ``boot_a``/``boot_b`` are (S, R) per-seed problem-bootstrap means that share one problem
    resample per column, so resample r uses the same problems for every drawn seed and both models.
    """
    return np.einsum("rs,sr->r", weights, np.asarray(boot_a) - np.asarray(boot_b))


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


def compare_single(a: np.ndarray, b: np.ndarray, boot_a: np.ndarray, boot_b: np.ndarray,
                   alpha: float = ALPHA) -> dict:
    """Statistics of A - B for one pair of runs, given their shared-index bootstrap means."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    boot = np.asarray(boot_a) - np.asarray(boot_b)
    binary = is_binary(a) and is_binary(b)
    counts = agreement_counts(a, b) if binary else _nan_counts()
    lo, hi = percentile_ci(boot, alpha)
    return {
        "acc_a": float(a.mean()), "acc_b": float(b.mean()), "diff": float(a.mean() - b.mean()),
        "ci_low": lo, "ci_high": hi, "se_paired": paired_se(a, b), "se_boot": float(np.std(boot, ddof=1)),
        "corr": paired_corr(a, b), **counts,
        "mcnemar_p": mcnemar_exact_p(counts["only_a"], counts["only_b"]) if binary else float("nan"),
        "boot_p": bootstrap_p(boot),
    }


def compare_pooled(a: np.ndarray, b: np.ndarray, boot_a: np.ndarray, boot_b: np.ndarray,
                   weights: np.ndarray, alpha: float = ALPHA) -> dict:
    """Statistics of A - B pooled over S paired training seeds (hierarchical bootstrap).

    ``a``/``b`` are (S, n) scores, seed s of A paired with seed s of B (an unseeded model such as
    base is repeated S times); ``boot_a``/``boot_b`` are (S, R); ``weights`` (R, S) from
    seed_resample_weights. The point estimate is the mean over seeds of the per-seed difference.
    se_paired and corr are the analytic, test-set-only values of the seed-averaged scores (compare
    se_paired with se_boot to see how much training noise adds); agreement counts are summed
    over seeds; McNemar is not defined for pooled seeds (NaN): use boot_p.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    boot = hierarchical_boot(boot_a, boot_b, weights)
    binary = is_binary(a) and is_binary(b)
    if binary:
        per_seed = [agreement_counts(x, y) for x, y in zip(a, b, strict=True)]
        counts = {k: sum(c[k] for c in per_seed) for k in per_seed[0]}
    else:
        counts = _nan_counts()
    lo, hi = percentile_ci(boot, alpha)
    ma, mb = a.mean(0), b.mean(0)
    return {
        "acc_a": float(a.mean()), "acc_b": float(b.mean()), "diff": float(np.mean(a.mean(1) - b.mean(1))),
        "ci_low": lo, "ci_high": hi, "se_paired": paired_se(ma, mb), "se_boot": float(np.std(boot, ddof=1)),
        "corr": paired_corr(ma, mb), **counts, "mcnemar_p": float("nan"), "boot_p": bootstrap_p(boot),
    }


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int = 10_000, seed: int = 0,
                     alpha: float = ALPHA) -> dict:
    """One-call paired comparison of two (n,) score vectors (see compare_single)."""
    boot = bootstrap_means(np.stack([a, b]), n_resamples, seed)
    return compare_single(a, b, boot[0], boot[1], alpha)


def pooled_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int = 10_000, seed: int = 0,
                     alpha: float = ALPHA) -> dict:
    """One-call pooled comparison of (S, n) score matrices (see compare_pooled)."""
    a = np.atleast_2d(a)
    b = np.atleast_2d(b)
    s = a.shape[0]
    boot = bootstrap_means(np.concatenate([a, b]), n_resamples, seed)
    w = seed_resample_weights(s, n_resamples, seed)
    return compare_pooled(a, b, boot[:s], boot[s:], w, alpha)
