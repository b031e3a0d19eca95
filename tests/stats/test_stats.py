"""mathpt.stats against independent float64 references and simulations with known truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mathpt import stats
from mathpt.io import DataError, MathptError

# ----------------------------------------------------------------------------- bootstrap core


def test_bootstrap_indices_deterministic():
    a = stats.bootstrap_indices(37, 50, seed=3)
    b = stats.bootstrap_indices(37, 50, seed=3)
    c = stats.bootstrap_indices(37, 50, seed=4)
    assert a.shape == (50, 37)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 36


@pytest.mark.parametrize("binary", [True, False])
def test_bootstrap_means_matches_reference_loop(monkeypatch, binary):
    # A tiny block size forces several index blocks, the path that large lm-eval tasks take.
    monkeypatch.setattr(stats, "_BLOCK_ELEMS", 200)
    rng = np.random.default_rng(11)
    m, n, R = 3, 57, 120
    x = (rng.random((m, n)) < 0.4).astype(np.float64) if binary else rng.normal(3.0, 2.0, (m, n))
    got = stats.bootstrap_means(x, R, seed=5)
    idx = stats.bootstrap_indices(n, R, seed=5)
    ref = np.empty((m, R))
    for r in range(R):
        for j in range(m):
            total = 0.0
            for i in idx[r]:
                total += float(x[j, i])
            ref[j, r] = total / n
    if binary:
        np.testing.assert_array_equal(got, ref)  # integer counts: sums are exact
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_bootstrap_shares_indices_across_models():
    # The difference of bootstrap means equals the bootstrap mean of the per-problem difference,
    # which holds only when A and B are resampled with the same indices.
    rng = np.random.default_rng(0)
    a, b = rng.random(80), rng.random(80)
    boot = stats.bootstrap_means(np.stack([a, b]), 400, seed=1)
    d = stats.bootstrap_means(a - b, 400, seed=1)[0]
    np.testing.assert_allclose(boot[0] - boot[1], d, atol=1e-12)


def test_bootstrap_p_reference():
    rng = np.random.default_rng(2)
    for loc in (-0.5, 0.0, 0.1, 3.0):
        d = rng.normal(loc, 1.0, 999)
        below, above = sum(1 for v in d if v <= 0), sum(1 for v in d if v >= 0)
        assert stats.bootstrap_p(d) == pytest.approx(min(1.0, 2 * (min(below, above) + 1) / 1000))


def test_bootstrap_ci_coverage_known_truth():
    """Strongly correlated paired 0/1 outcomes with a known difference: the paired percentile CI
    covers it about 95% of the time (an unpaired or index-mismatched bootstrap would be far wider
    and cover ~100%)."""
    probs = np.array([0.50, 0.08, 0.03, 0.39])  # both right, only A, only B, both wrong
    truth = probs[1] - probs[2]
    rng = np.random.default_rng(123)
    n, sims, R = 200, 400, 1000
    hits, widths = 0, []
    for k in range(sims):
        cell = rng.choice(4, size=n, p=probs)
        a = np.isin(cell, (0, 1)).astype(float)
        b = np.isin(cell, (0, 2)).astype(float)
        r = stats.paired_bootstrap(a, b, n_resamples=R, seed=k)
        hits += r["ci_low"] <= truth <= r["ci_high"]
        widths.append(r["ci_high"] - r["ci_low"])
    coverage = hits / sims
    assert 0.91 <= coverage <= 0.98, coverage
    true_se = math.sqrt((probs[1] + probs[2] - truth**2) / n)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * true_se, rel=0.1)


# ----------------------------------------------------------------------------- paired comparisons


def test_identical_models_degenerate_interval():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.3).astype(float)
    r = stats.paired_bootstrap(a, a.copy(), n_resamples=2000, seed=0)
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["se_paired"] == 0.0 and r["se_boot"] == 0.0
    assert r["only_a"] == 0 and r["only_b"] == 0
    assert r["mcnemar_p"] == 1.0 and r["boot_p"] == 1.0
    assert r["corr"] == pytest.approx(1.0)
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in r.values()), r
    # All-wrong identical models (a tiny model's usual score): same, only corr is undefined.
    z = np.zeros(50)
    r = stats.paired_bootstrap(z, z, n_resamples=500, seed=0)
    assert (r["diff"], r["ci_low"], r["ci_high"], r["se_paired"], r["mcnemar_p"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert math.isnan(r["corr"])
    # Pooled seeds of identical models: also exactly zero.
    A = (rng.random((3, 40)) < 0.5).astype(float)
    r = stats.compare_seeds(A, A.copy())
    assert (r["diff"], r["ci_low"], r["ci_high"], r["se_combined"], r["t_p"]) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_paired_se_and_corr_vs_direct_formula():
    rng = np.random.default_rng(7)
    for binary in (True, False):
        n = 97
        a = (rng.random(n) < 0.6).astype(float) if binary else rng.normal(size=n)
        b = np.where(rng.random(n) < 0.7, a, 1 - a) if binary else 0.5 * a + rng.normal(size=n)
        ma, mb = sum(a) / n, sum(b) / n
        var_a = sum((x - ma) ** 2 for x in a) / (n - 1)
        var_b = sum((y - mb) ** 2 for y in b) / (n - 1)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / (n - 1)
        assert stats.paired_se(a, b) == pytest.approx(math.sqrt((var_a + var_b - 2 * cov) / n), rel=1e-12)
        assert stats.paired_corr(a, b) == pytest.approx(cov / math.sqrt(var_a * var_b), rel=1e-12)
    assert math.isnan(stats.paired_se([1.0], [0.0]))


def test_agreement_counts_vs_loop():
    rng = np.random.default_rng(3)
    a = (rng.random(200) < 0.5).astype(float)
    b = (rng.random(200) < 0.4).astype(float)
    ref = {"both_right": 0, "only_a": 0, "only_b": 0, "both_wrong": 0}
    for x, y in zip(a, b, strict=True):
        key = {(1, 1): "both_right", (1, 0): "only_a", (0, 1): "only_b", (0, 0): "both_wrong"}[
            (int(x), int(y))
        ]
        ref[key] += 1
    assert stats.agreement_counts(a, b) == ref


def test_mcnemar_matches_exact_binomial():
    from scipy.stats import binomtest
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(9)
    for b, c in [(0, 0), (0, 1), (5, 5), (1, 9), (30, 12)] + [
        tuple(rng.integers(0, 60, 2)) for _ in range(20)
    ]:
        got = stats.mcnemar_exact_p(b, c)
        n = int(b) + int(c)
        if n == 0:
            assert got == 1.0
            continue
        ref = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
        assert got == pytest.approx(ref, rel=1e-10, abs=1e-15)
        assert got == pytest.approx(binomtest(int(b), n, 0.5).pvalue, rel=1e-10)
        assert got == pytest.approx(mcnemar([[10, b], [c, 10]], exact=True).pvalue, rel=1e-10)


def _holm_reference(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def test_holm_vs_reference_and_nan():
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = list(rng.random(int(rng.integers(1, 12))) ** 3)
        np.testing.assert_allclose(stats.holm(p), _holm_reference(p), rtol=1e-12)
    p = [0.01, float("nan"), 0.04, 0.03]
    got = stats.holm(p)
    assert math.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2, 3]], _holm_reference([0.01, 0.04, 0.03]))


def test_wilson_vs_formula():
    z = 1.959963984540054
    for k, n in [(0, 10), (3, 10), (10, 10), (537, 1319)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = stats.wilson_ci(k, n)
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-9)


def test_seed_t_interval_vs_scipy_ttest():
    rng = np.random.default_rng(8)
    for s in (2, 3, 5, 10):
        for _ in range(5):
            x = rng.normal(rng.normal(0, 0.05), rng.uniform(0.001, 0.1), s)
            ref = scipy_stats.ttest_1samp(x, 0.0)
            lo, hi = ref.confidence_interval(0.95)
            got = stats.seed_t_interval(x)
            assert got["df"] == s - 1
            assert got["mean"] == pytest.approx(float(np.mean(x)), abs=1e-15)
            assert got["se"] == pytest.approx(
                math.sqrt(sum((v - x.mean()) ** 2 for v in x) / (s - 1) / s), rel=1e-12
            )
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), rel=1e-10)
            assert got["p"] == pytest.approx(ref.pvalue, rel=1e-10)
            arr = stats.seed_t_arrays(np.stack([x, x[::-1]]))  # the vectorized form agrees
            np.testing.assert_allclose(arr["ci_low"], [lo, lo], rtol=1e-10)
    with pytest.raises(MathptError, match="at least 2 seeds"):
        stats.seed_t_interval([0.3])
    same = stats.seed_t_interval([0.25, 0.25, 0.25])  # spread unobserved: undefined, not certain
    assert same["mean"] == 0.25 and all(math.isnan(same[k]) for k in ("ci_low", "ci_high", "p"))
    zero = stats.seed_t_interval([0.0, 0.0])
    assert (zero["ci_low"], zero["ci_high"], zero["p"]) == (0.0, 0.0, 1.0)


def _two_way_reference(d: list[list[float]]) -> dict:
    """The seeds x problems interval written out with Python floats and loops (float64)."""
    S, n = len(d), len(d[0])
    g = sum(sum(r) for r in d) / (S * n)
    row = [sum(r) / n for r in d]
    col = [sum(d[s][i] for s in range(S)) / S for i in range(n)]
    ms_s = n * sum((x - g) ** 2 for x in row) / (S - 1)
    ms_p = S * sum((x - g) ** 2 for x in col) / (n - 1)
    ms_r = sum((d[s][i] - row[s] - col[i] + g) ** 2 for s in range(S) for i in range(n)) / ((S - 1) * (n - 1))
    prob = max(ms_p - ms_r, 0.0)
    v = (ms_s + prob) / (n * S)
    den = ms_s**2 * (S + 1) / (S - 1) ** 2 + (
        (ms_p**2 / (n - 1) + ms_r**2 / ((S - 1) * (n - 1))) if prob else 0
    )
    df = max(S - 1, (ms_s + prob) ** 2 / den)
    se = math.sqrt(v)
    q = scipy_stats.t.ppf(0.975, df)
    return {
        "mean": g,
        "se": se,
        "df": df,
        "ci_low": g - q * se,
        "ci_high": g + q * se,
        "p": 2 * scipy_stats.t.sf(abs(g) / se, df),
    }


def test_seeds_problems_interval_vs_float64_reference():
    rng = np.random.default_rng(9)
    for S, n, binary in ((2, 30, True), (3, 57, True), (5, 40, False), (4, 25, True)):
        for _ in range(3):
            if binary:
                q = rng.random(n)
                d = (rng.random((S, n)) < q + rng.normal(0, 0.1, (S, 1))) * 1.0 - (rng.random((S, n)) < q)
            else:
                d = rng.normal(0.1, 1.0, (S, n)) + rng.normal(0, 0.3, (S, 1)) + rng.normal(0, 0.5, n)
            got = stats.seeds_problems_interval(d)
            ref = _two_way_reference(d.tolist())
            for k, v in ref.items():
                assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-14), (S, n, k)
            arr = stats.seeds_problems_arrays(np.stack([d, d[::-1]]))  # vectorized; seed order is irrelevant
            np.testing.assert_allclose(arr["ci_low"], [ref["ci_low"]] * 2, rtol=1e-10)
    # Without problem variance it is exactly the t over per-seed means (df = S - 1).
    d = np.tile(rng.normal(0, 1, (4, 1)), (1, 10)) + np.tile(np.linspace(-1, 1, 10), (4, 1)) * 0
    got = stats.seeds_problems_interval(d)
    ref = scipy_stats.ttest_1samp(d.mean(1), 0.0)
    assert got["df"] == 3 and got["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    with pytest.raises(MathptError, match="at least 2 seeds"):
        stats.seeds_problems_interval(np.zeros((1, 10)))
    same = stats.seeds_problems_interval(np.full((3, 10), 0.25))  # no spread anywhere: undefined
    assert all(math.isnan(same[k]) for k in ("ci_low", "ci_high", "p"))


def test_compare_seeds_vs_direct_computation():
    rng = np.random.default_rng(9)
    S, n = 4, 150
    q = rng.random(n)
    a = (rng.random((S, n)) < q + rng.normal(0.05, 0.05, (S, 1))).astype(float)
    b = (rng.random((S, n)) < q).astype(float)
    r = stats.compare_seeds(a, b)
    ref = _two_way_reference((a - b).tolist())
    assert r["diff"] == pytest.approx(ref["mean"]) and r["ci_df"] == pytest.approx(ref["df"])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ref["ci_low"], ref["ci_high"]), rel=1e-10)
    assert r["t_p"] == pytest.approx(ref["p"], rel=1e-10)
    assert r["se_seeds"] == pytest.approx(np.std((a - b).mean(1), ddof=1) / math.sqrt(S), rel=1e-10)
    assert r["only_a"] == sum(int(np.sum((a[s] == 1) & (b[s] == 0))) for s in range(S))
    assert r["se_paired"] == pytest.approx(stats.paired_se(a.mean(0), b.mean(0)))
    assert math.isnan(r["mcnemar_p"]) and math.isnan(r["boot_p"])  # no per-problem test for pooled seeds
    with pytest.raises(MathptError, match="shape"):
        stats.compare_seeds(a, b[:3])


def test_mde_vs_monte_carlo_power():
    """At the returned MDE a level-5% two-sided t-test rejects 80% of the time (simulated directly:
    Z ~ N(mde / se, 1), SE estimate ~ se * sqrt(chi2_df / df)); df = inf is (1.96 + 0.8416) se."""
    # the far tail (rejecting on the wrong side) makes the exact value a hair below the textbook sum
    assert stats.mde(0.01, math.inf) == pytest.approx(0.01 * (1.959963985 + 0.841621234), rel=1e-5)
    rng = np.random.default_rng(4)
    sims = 200_000  # Monte Carlo SE of a power of 0.8: 0.0009
    for df in (2, 4.5, 30):
        se = 0.013
        m = stats.mde(se, df)
        t = rng.normal(m / se, 1.0, sims) / np.sqrt(rng.chisquare(df, sims) / df)
        crit = scipy_stats.t.ppf(0.975, df)
        assert np.mean(np.abs(t) > crit) == pytest.approx(0.8, abs=0.004), df
        assert stats.mde(se, df, alpha=0.0125) > m  # a stricter level needs a bigger effect
    assert math.isnan(stats.mde(0.0, 3)) and math.isnan(stats.mde(float("nan"), 3))


def _simulate_null_differences(S: int, tau: float, alg: float, sims: int, n: int = 300) -> np.ndarray:
    """(sims, S, n) per-problem differences A - B of two equally good algorithms, 0/1 scores.

    Problem difficulty z_i ~ N(0, 1.5) on the logit scale; each (model, seed) gets a logit shift of SD
    ``tau`` (half of it shared by A and B of the same seed, as when PG starts from that seed's SFT);
    each problem favours A or B by a_i ~ N(0, ``alg``) (A gets +a_i, B -a_i, so over new problems the
    difference is 0 but on these problems it need not be).
    """
    from scipy.special import expit

    rng = np.random.default_rng([7, S, int(tau * 100), int(alg * 100)])
    out = np.empty((sims, S, n))
    for c in range(0, sims, 500):
        k = min(500, sims - c)
        z = rng.normal(0, 1.5, (k, 1, n))
        a_i = rng.normal(0, alg, (k, 1, n))
        shared = rng.normal(0, tau, (k, S, 1)) * math.sqrt(0.5)
        ua = shared + rng.normal(0, tau, (k, S, 1)) * math.sqrt(0.5)
        ub = shared + rng.normal(0, tau, (k, S, 1)) * math.sqrt(0.5)
        a = rng.random((k, S, n)) < expit(z + a_i + ua)
        b = rng.random((k, S, n)) < expit(z - a_i + ub)
        out[c : c + k] = a.astype(np.float64) - b
    return out


@pytest.mark.parametrize("S", [3, 5])
def test_seeds_problems_false_positive_rate(S):
    """Two equally good algorithms, 300 problems, 0/1 scores: the interval excludes 0 at most 6% of
    the time at nominal 5%, for seed spreads from none to far above the problem noise (logit SD 0 to
    3: per-seed accuracy SD 0 to ~30 points vs a problem-noise SE of ~3 points) and with or without
    problem-specific strengths. 3,000 studies per cell: Monte Carlo SE of a 5% rate 0.40 points, so
    6% is 2.5 SE above nominal. The t over per-seed differences alone fails this (checked below)."""
    sims = 3000
    worst_t = 0.0
    for tau in (0.0, 0.1, 0.3, 0.5, 1.0, 3.0):
        for alg in (0.0, 0.7):
            d = _simulate_null_differences(S, tau, alg, sims)
            r = stats.seeds_problems_arrays(d)
            fpr = float(np.mean((r["ci_low"] > 0) | (r["ci_high"] < 0)))
            assert fpr <= 0.06, (S, tau, alg, fpr)
            assert fpr >= 0.02, (S, tau, alg, fpr)  # not trivially conservative either
            np.testing.assert_array_equal(r["p"] < 0.05, (r["ci_low"] > 0) | (r["ci_high"] < 0))
            old = stats.seed_t_arrays(d.mean(-1))
            worst_t = max(worst_t, float(np.mean((old["ci_low"] > 0) | (old["ci_high"] < 0))))
    if S == 5:  # conditional on these problems, the old interval over-rejects (~11%)
        assert worst_t > 0.08, worst_t


def _simulate_seed_accuracies(
    n_seeds: int, spread_pts: float, effect_pts: float, sims: int, seed: int, n: int = 1319
) -> np.ndarray:
    """(sims, 2, S) accuracies of models A and B: n problems of logit difficulty z ~ N(0, 2), one
    logit shift per (model, seed) whose accuracy SD is ``spread_pts``, A better by ``effect_pts``."""
    from scipy.special import expit

    rng = np.random.default_rng([seed, n_seeds, int(spread_pts * 10), int(effect_pts * 10)])
    z = rng.normal(0.0, 2.0, n)
    u_sd = spread_pts / 100 / float(np.mean(expit(z) * (1 - expit(z))))  # first-order: d acc / d logit
    lo, hi = -5.0, 5.0
    for _ in range(60):  # A's logit shift that gives effect_pts more accuracy
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expit(z + mid).mean() - expit(z).mean() < effect_pts / 100 else (lo, mid)
    u = rng.normal(0.0, u_sd, (sims, 2, n_seeds)) + np.array([lo, 0.0])[None, :, None]
    acc = np.empty((sims, 2, n_seeds))
    for c in range(0, sims, 500):  # per-problem 0/1 outcomes, in chunks to bound memory
        p = expit(z + u[c : c + 500, ..., None])
        acc[c : c + 500] = (rng.random(p.shape, dtype=np.float32) < p).mean(-1)
    return acc


@pytest.mark.slow
@pytest.mark.parametrize("n_seeds", [3, 5])
def test_seed_interval_false_positive_rate(n_seeds):
    """Two identical algorithms, 1,319 problems: the pooled interval excludes 0 at most 6% of the
    time at nominal 5%, whatever the seed-to-seed spread (the old hierarchical bootstrap: ~20%)."""
    sims = 8000  # Monte Carlo SE of a 5% rate: 0.24 points, so 6% is 4 SE away
    for spread in (0.0, 4.0, 8.0):
        acc = _simulate_seed_accuracies(n_seeds, spread, 0.0, sims, seed=1)
        if spread:  # the simulation has the spread it claims
            assert acc[:, 1].std(-1, ddof=1).mean() == pytest.approx(spread / 100, rel=0.25)
        r = stats.seed_t_arrays(acc[:, 0] - acc[:, 1])
        fpr = float(np.mean((r["ci_low"] > 0) | (r["ci_high"] < 0)))
        assert fpr <= 0.06, (n_seeds, spread, fpr)
        assert fpr >= 0.03, (n_seeds, spread, fpr)  # not trivially conservative either
        np.testing.assert_allclose(r["p"] < 0.05, (r["ci_low"] > 0) | (r["ci_high"] < 0))


@pytest.mark.parametrize("n_seeds, min_power", [(3, 0.95), (5, 0.99)])
def test_seed_interval_detects_a_real_effect(n_seeds, min_power):
    """A 10-point effect with small seed noise (1 point) is detected, and covered ~95% of the time."""
    acc = _simulate_seed_accuracies(n_seeds, 1.0, 10.0, 1000, seed=2)
    d = acc[:, 0] - acc[:, 1]
    r = stats.seed_t_arrays(d)
    assert np.mean(r["ci_low"] > 0) >= min_power
    truth = float(d.mean())  # the effect the simulation realised (10 points up to clipping)
    assert truth == pytest.approx(0.10, abs=0.005)
    assert 0.93 <= np.mean((r["ci_low"] <= truth) & (truth <= r["ci_high"])) <= 0.97


# ----------------------------------------------------------------------------- reading files


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _eval_row(i, correct, gold="1"):
    return json.dumps(
        {
            "index": i,
            "id": f"test-{i:05d}",
            "prompt_hash": "h",
            "response": "r",
            "extracted": gold,
            "gold": gold,
            "correct": correct,
            "generated_tokens": 3,
            "truncated": False,
        }
    )


def test_read_eval_scores_sorts_by_index(tmp_path):
    p = _write(
        tmp_path / "e.jsonl", [_eval_row(2, True, "7"), "", _eval_row(0, False, "5"), _eval_row(1, True)]
    )
    r = stats.read_eval_scores(p)
    assert r.index.tolist() == [0, 1, 2]
    assert r.score.tolist() == [0.0, 1.0, 1.0]
    assert r.gold == ("5", "1", "7") and r.binary


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"index": 1, "gold": "1"}', "missing key"),
        ('{"index": "1", "gold": "1", "correct": true}', "must be an integer"),
        ('{"index": 1, "gold": "1", "correct": "yes"}', "'correct' must be true or false"),
        (_eval_row(0, True), "duplicate index 0 (first on line 1)"),
    ],
)
def test_malformed_eval_file_names_path_and_line(tmp_path, bad, msg):
    p = _write(tmp_path / "bad.jsonl", [_eval_row(0, True), "", bad])
    with pytest.raises(DataError) as e:
        stats.read_eval_scores(p)
    assert f"{p}:3:" in str(e.value) and msg in str(e.value)


def test_empty_or_missing_eval_file(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        stats.read_eval_scores(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="not found"):
        stats.read_eval_scores(tmp_path / "nope.jsonl")


def test_per_doc_rejects_non_finite_and_mixed_metrics(tmp_path):
    p = _write(
        tmp_path / "d.jsonl",
        ['{"doc_id": 0, "score": 1.5, "metric": "ppl"}', '{"doc_id": 1, "score": NaN, "metric": "ppl"}'],
    )
    with pytest.raises(DataError, match=rf"{p}:2: 'score' must be a finite number"):
        stats.read_per_doc_scores(p)
    p = _write(
        tmp_path / "m.jsonl",
        ['{"doc_id": 0, "score": 1.0, "metric": "acc"}', '{"doc_id": 1, "score": 0.0, "metric": "acc_norm"}'],
    )
    with pytest.raises(DataError, match="mixed metrics"):
        stats.read_per_doc_scores(p)


def test_align_rejects_different_problems_or_gold(tmp_path):
    a = stats.read_eval_scores(_write(tmp_path / "a.jsonl", [_eval_row(i, True) for i in range(4)]))
    b = stats.read_eval_scores(_write(tmp_path / "b.jsonl", [_eval_row(i, False) for i in range(1, 5)]))
    c = stats.read_eval_scores(
        _write(tmp_path / "c.jsonl", [_eval_row(i, False, "9" if i == 2 else "1") for i in range(4)])
    )
    assert stats.align({"a": a, "a2": a}).shape == (2, 4)
    with pytest.raises(MathptError) as e:
        stats.align({"a": a, "b": b})
    assert "a.jsonl" in str(e.value) and "b.jsonl" in str(e.value) and "[4]" in str(e.value)
    with pytest.raises(MathptError, match="gold answers differ at index 2"):
        stats.align({"a": a, "c": c})
