"""End-to-end CI tables from small eval / per-doc jsonl files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mathpt import ci_table, stats
from mathpt.io import MathptError

META = {
    "benchmark": "gsm8k",
    "split": "test",
    "scorer": "math-verify 0.9.0",
    "k_shot": 4,
    "decoding": "greedy, max 256 tokens",
    "code_version": "abc123",
    "task_versions": {"gsm8k": 1},
}
N, R = 60, 400
ACC = {"base": 0.2, "sft": 0.4, "no_baseline": 0.35, "reinforce_with_baseline": 0.5, "grpo_clip": 0.55}


def _write_eval(path, correct, gold=None, formatted=None, any_format=None, truncated=None):
    n = len(correct)
    formatted = np.ones(n, bool) if formatted is None else formatted
    any_format = np.asarray(correct, bool) if any_format is None else any_format
    truncated = np.zeros(n, bool) if truncated is None else truncated
    rows = [
        {
            "index": i,
            "id": f"test-{i:05d}",
            "prompt_hash": "h",
            "response": "r",
            "extracted": None,
            "gold": (gold or {}).get(i, str(i)),
            "correct": bool(c),
            "formatted": bool(formatted[i]),
            "correct_any_format": bool(any_format[i]),
            "generated_tokens": 1 + i % 4,
            "truncated": bool(truncated[i]),
        }
        for i, c in enumerate(correct)
    ]
    rng = np.random.default_rng(len(str(path)))
    rng.shuffle(rows)  # file order must not matter
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def evals(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.random(N)
    out, scores = {}, {}
    for model, acc in ACC.items():
        for seed in [None] if model == "base" else [0, 1]:
            c = (rng.random(N) * 0.5 + difficulty * 0.5 < acc).astype(float)
            name = ci_table.model_name(model, seed)
            out.setdefault(model, {})[seed] = str(_write_eval(tmp_path / f"{name}.jsonl", c))
            scores[(model, seed)] = c
    return out, scores


def _num(v):
    return float("nan") if v == "" else float(v)


def test_ci_table_end_to_end(tmp_path, evals):
    paths, scores = evals
    out = tmp_path / "results" / "ci_table.csv"
    rows = ci_table.build_ci_table(paths, out, META, n_resamples=R, seed=0)
    assert len(rows) == 10 * 3  # 10 declared comparisons x (2 seeds + pooled)
    csv_rows = ci_table.read_csv(out)
    assert len(csv_rows) == len(rows)
    assert set(ci_table.CI_COLUMNS) <= set(csv_rows[0])
    assert {(r["model_a"], r["model_b"]) for r in csv_rows} == set(ci_table.declared_comparisons(ACC))
    for r in csv_rows:
        assert (r["benchmark"], r["split"], r["n"], r["k_shot"], r["code_version"]) == (
            "gsm8k",
            "test",
            "60",
            "4",
            "abc123",
        )
        assert json.loads(r["task_versions"]) == {"gsm8k": 1}
        assert _num(r["ci_low"]) <= _num(r["diff"]) + 1e-12 and _num(r["diff"]) <= _num(r["ci_high"]) + 1e-12

    # A per-seed row against direct computations on the raw scores.
    row = next(r for r in csv_rows if (r["model_a"], r["model_b"], r["seed"]) == ("grpo_clip", "base", "1"))
    a, b = scores[("grpo_clip", 1)], scores[("base", None)]
    assert _num(row["acc_a"]) == pytest.approx(a.mean()) and _num(row["diff"]) == pytest.approx(
        a.mean() - b.mean()
    )
    only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    assert (int(row["only_a"]), int(row["only_b"])) == (only_a, only_b)
    assert int(row["both_right"]) + only_a + only_b + int(row["both_wrong"]) == N
    assert _num(row["mcnemar_p"]) == pytest.approx(stats.mcnemar_exact_p(only_a, only_b))
    assert row["p_method"] == "mcnemar_exact"
    # Same resample indices for every model: the table's interval is the one-pair bootstrap's.
    ref = stats.paired_bootstrap(a, b, n_resamples=R, seed=0)
    assert (_num(row["ci_low"]), _num(row["ci_high"])) == pytest.approx((ref["ci_low"], ref["ci_high"]))

    # Several seeds: per-seed rows are labelled diagnostics, outside every Holm family.
    assert (
        row["family"] == "diagnostic"
        and row["holm_p"] == ""
        and row["ci_covers"] == ci_table.COVERS_DIAGNOSTIC
    )
    assert _num(row["mde80"]) == pytest.approx(stats.mde(_num(row["se_paired"]), math.inf))

    # Pooled row: the seeds x problems interval of the two (S, n) matrices, t p, no McNemar.
    pooled = next(
        r for r in csv_rows if (r["model_a"], r["model_b"], r["seed"]) == ("grpo_clip", "sft", "pooled")
    )
    a = np.stack([scores[("grpo_clip", s)] for s in (0, 1)])
    b = np.stack([scores[("sft", s)] for s in (0, 1)])
    ref = stats.compare_seeds(a, b)
    for k in ("diff", "ci_low", "ci_high", "ci_df", "se_combined", "se_seeds", "t_p"):
        assert _num(pooled[k]) == pytest.approx(ref[k], rel=1e-12), k
    assert pooled["n_seeds"] == "2" and pooled["p_method"] == "seeds_problems_t" and pooled["mcnemar_p"] == ""
    assert pooled["ci_method"] == "seeds_x_problems_t" and pooled["ci_covers"] == ci_table.COVERS_SEEDS
    assert pooled["family"] == "primary"
    assert _num(pooled["mde80"]) == pytest.approx(stats.mde(ref["se_combined"], ref["ci_df"]))

    # Holm within the primary family (3 PG variants vs SFT + GRPO-clip vs REINFORCE+baseline) and,
    # separately, within the exploratory family, both over pooled rows, against a plain reference.
    for family, size in (("primary", 4), ("exploratory", 6)):
        fam = [r for r in csv_rows if r["family"] == family]
        assert len(fam) == size and all(r["seed"] == "pooled" for r in fam)
        p = [_num(r["t_p"]) for r in fam]
        m, order = len(p), np.argsort(p)
        ref_holm, running = np.empty(m), 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * p[i]))
            ref_holm[i] = running
        np.testing.assert_allclose([_num(r["holm_p"]) for r in fam], ref_holm, rtol=1e-10)
        for r in fam:
            holm_mde = stats.mde(_num(r["se_combined"]), _num(r["ci_df"]), 0.05 / 4)
            assert (
                _num(r["mde80_holm"]) == pytest.approx(holm_mde)
                if family == "primary"
                else r["mde80_holm"] == ""
            )
    primary = {(r["model_a"], r["model_b"]) for r in csv_rows if r["family"] == "primary"}
    assert primary == {
        ("no_baseline", "sft"),
        ("reinforce_with_baseline", "sft"),
        ("grpo_clip", "sft"),
        ("grpo_clip", "reinforce_with_baseline"),
    }


def test_primary_family_follows_the_algorithm_registry(monkeypatch):
    """A PG variant added to mathpt.algorithms is primary against SFT with no list to edit here."""
    monkeypatch.setattr(ci_table, "PG_ALGOS", (*ci_table.PG_ALGOS, "new_algo"))
    models = ["base", "sft", "grpo_clip", "reinforce_with_baseline", "new_algo"]
    primary = ci_table.primary_comparisons(models)
    assert ("new_algo", "sft") in primary and len(primary) == 4
    assert ci_table.family_of("new_algo", "sft") == "primary"
    assert ci_table.family_of("new_algo", "grpo_clip") == "exploratory"
    assert ci_table.family_of("sft", "base") == "exploratory"
    comps = ci_table.declared_comparisons(models)
    assert comps[:4] == primary and len(set(comps)) == len(comps)
    assert ("reinforce_with_baseline", "grpo_clip") not in comps  # the primary pair is not repeated reversed


def test_ci_table_single_seed_and_subset(tmp_path, evals):
    paths, _ = evals
    sub = {"base": paths["base"], "sft": {0: paths["sft"][0]}, "grpo_clip": {0: paths["grpo_clip"][0]}}
    rows = ci_table.build_ci_table(sub, tmp_path / "ci.csv", META, n_resamples=R)
    assert [(r["model_a"], r["model_b"], r["seed"]) for r in rows] == [  # primary first
        ("grpo_clip", "sft", 0),
        ("sft", "base", 0),
        ("grpo_clip", "base", 0),
    ]
    # One seed: no pooled row, and every row says its interval ignores between-seed variance.
    assert all("between-seed variance is NOT covered" in r["ci_covers"] for r in rows)
    acc = ci_table.build_accuracy_table(sub, tmp_path / "acc.csv", META, n_resamples=R)
    assert all("NOT covered" in r["ci_covers"] for r in acc if r["model"] != "base")
    assert acc[0]["ci_covers"] == ci_table.COVERS_UNSEEDED and not any(r["seed"] == "pooled" for r in acc)
    rows = ci_table.build_ci_table(
        sub, tmp_path / "ci2.csv", META, n_resamples=R, comparisons=[("sft", "base")]
    )
    assert len(rows) == 1 and rows[0]["holm_p"] == pytest.approx(rows[0]["mcnemar_p"])
    # One seed: the single rows are the headline, in their families, with a problem-only MDE.
    rows = ci_table.build_ci_table(sub, tmp_path / "ci3.csv", META, n_resamples=R)
    assert [r["family"] for r in rows] == ["primary", "exploratory", "exploratory"]
    assert rows[0]["holm_p"] == pytest.approx(rows[0]["mcnemar_p"])  # a family of one
    assert rows[0]["mde80"] == pytest.approx(2.8016 * rows[0]["se_paired"], rel=1e-4)


def test_ci_table_identical_models_no_nan(tmp_path, evals):
    paths, _ = evals
    same = {"base": paths["base"], "sft": {None: paths["base"][None]}}
    (row,) = ci_table.build_ci_table(same, tmp_path / "ci.csv", META, n_resamples=R)
    for k in ("diff", "ci_low", "ci_high", "se_paired", "se_boot", "only_a", "only_b"):
        assert row[k] == 0
    assert row["mcnemar_p"] == 1.0 and row["holm_p"] == 1.0 and not math.isnan(row["corr"])
    assert row["seed"] == ""


def test_ci_table_errors(tmp_path, evals):
    paths, _ = evals
    with pytest.raises(MathptError, match="decoding"):
        ci_table.build_ci_table(
            paths, tmp_path / "x.csv", {k: v for k, v in META.items() if k != "decoding"}, n_resamples=R
        )
    with pytest.raises(MathptError, match="'nope'"):
        ci_table.build_ci_table(
            paths, tmp_path / "x.csv", META, n_resamples=R, comparisons=[("nope", "base")]
        )
    bad = _write_eval(tmp_path / "short.jsonl", np.ones(N - 1))
    with pytest.raises(MathptError, match="short.jsonl"):
        ci_table.build_ci_table(
            {**paths, "sft": {0: str(bad), 1: paths["sft"][1]}}, tmp_path / "x.csv", META, n_resamples=R
        )
    wrong_gold = _write_eval(tmp_path / "gold.jsonl", np.ones(N), gold={7: "999"})
    with pytest.raises(MathptError, match="gold answers differ at index 7"):
        ci_table.build_ci_table(
            {**paths, "sft": {0: str(wrong_gold), 1: paths["sft"][1]}},
            tmp_path / "x.csv",
            META,
            n_resamples=R,
        )
    with pytest.raises(MathptError, match="seeds are paired by number"):
        ci_table.build_ci_table(
            {**paths, "sft": {0: paths["sft"][0]}}, tmp_path / "x.csv", META, n_resamples=R
        )
    assert not (tmp_path / "x.csv").exists()


def test_accuracy_table(tmp_path, evals):
    paths, scores = evals
    rows = ci_table.build_accuracy_table(paths, tmp_path / "acc.csv", META, n_resamples=R)
    assert len(rows) == 1 + 4 * 3
    base = rows[0]
    k = int(scores[("base", None)].sum())
    assert (base["model"], base["seed"], base["n_correct"], base["ci_method"]) == ("base", "", k, "wilson")
    assert (base["ci_low"], base["ci_high"]) == pytest.approx(stats.wilson_ci(k, N))
    pooled = next(r for r in rows if r["model"] == "sft" and r["seed"] == "pooled")
    per_seed = [scores[("sft", 0)].mean(), scores[("sft", 1)].mean()]
    assert pooled["acc"] == pytest.approx(np.mean(per_seed))
    ref = stats.seeds_problems_interval(np.stack([scores[("sft", 0)], scores[("sft", 1)]]))
    assert (pooled["ci_low"], pooled["ci_high"], pooled["ci_df"]) == pytest.approx(
        (ref["ci_low"], ref["ci_high"], ref["df"])
    )
    assert pooled["ci_method"] == "seeds_x_problems_t" and pooled["ci_covers"] == ci_table.COVERS_SEEDS
    assert "acc_kshot" not in pooled  # eval rows without the secondary k-shot eval
    assert len(ci_table.read_csv(tmp_path / "acc.csv")) == len(rows)


def test_accuracy_table_rates(tmp_path, evals):
    """Format rate, accuracy ignoring format and truncated fraction per run, means on the pooled row."""
    paths, scores = evals
    rng = np.random.default_rng(5)
    rates = {}
    for s in (0, 1):
        correct = scores[("sft", s)]
        fmt = rng.random(N) < 0.4
        anyf = (correct == 1) | (rng.random(N) < 0.3)
        trunc = rng.random(N) < 0.2
        paths["sft"][s] = str(
            _write_eval(
                tmp_path / f"sft-rates{s}.jsonl", correct, formatted=fmt, any_format=anyf, truncated=trunc
            )
        )
        rates[s] = (fmt.mean(), anyf.mean(), trunc.mean(), np.mean([1 + i % 4 for i in range(N)]))
    rows = ci_table.build_accuracy_table(paths, tmp_path / "acc.csv", META, n_resamples=R)
    for s in (0, 1):
        r = next(r for r in rows if r["model"] == "sft" and r["seed"] == s)
        assert (
            r["format_rate"],
            r["acc_any_format"],
            r["truncated_fraction"],
            r["mean_generated_tokens"],
        ) == pytest.approx(rates[s])
    pooled = next(r for r in rows if r["model"] == "sft" and r["seed"] == "pooled")
    assert pooled["truncated_fraction"] == pytest.approx((rates[0][2] + rates[1][2]) / 2)
    csv_row = next(
        r for r in ci_table.read_csv(tmp_path / "acc.csv") if r["model"] == "sft" and r["seed"] == "0"
    )
    assert float(csv_row["format_rate"]) == pytest.approx(rates[0][0])
    # An eval file from before these keys existed is refused with its path and line.
    old = tmp_path / "old.jsonl"
    old.write_text(
        json.dumps({"index": 0, "gold": "1", "correct": True, "generated_tokens": 1, "truncated": False})
        + "\n"
    )
    with pytest.raises(MathptError, match="old.jsonl:1: eval row lacks"):
        ci_table.eval_rates(old)


def test_regressions_table(tmp_path):
    rng = np.random.default_rng(1)
    per_doc = {}
    for model, seeds in (("base", [None]), ("sft", [0, 1]), ("grpo_clip", [0, 1])):
        for s in seeds:
            name = ci_table.model_name(model, s)
            acc = [{"doc_id": i, "score": float(rng.random() < 0.5), "metric": "acc"} for i in range(40)]
            ppl = [
                {"doc_id": i, "score": float(rng.lognormal(3, 0.3)), "metric": "word_perplexity"}
                for i in range(25)
            ]
            files = {}
            for task, rows in (("arc_local", acc), ("wikitext_local", ppl)):
                p = tmp_path / f"{name}_{task}.jsonl"
                p.write_text("".join(json.dumps(r) + "\n" for r in rows))
                files[task] = str(p)
            per_doc.setdefault(model, {})[s] = files
    meta = {
        "split": "test",
        "k_shot": {"arc_local": 2, "wikitext_local": 0},
        "decoding": "loglikelihood",
        "code_version": "abc",
        "task_versions": {"arc_local": 1, "wikitext_local": 2},
    }
    out = tmp_path / "regressions.csv"
    rows = ci_table.build_regressions_table(per_doc, out, meta, n_resamples=R)
    assert len(rows) == 2 * 2 * 3  # tasks x models x (2 seeds + pooled)
    for r in rows:
        wiki = r["task"] == "wikitext_local"
        assert r["metric"] == ("word_perplexity" if wiki else "acc")
        assert r["n"] == (25 if wiki else 40) and r["k_shot"] == (0 if wiki else 2)
        assert r["task_versions"] == (2 if wiki else 1)
        if wiki:  # continuous: no McNemar or agreement counts; the bootstrap p is Holm-adjusted
            assert math.isnan(r["mcnemar_p"]) and r["only_a"] is None
            assert r["p_method"] == ("seeds_problems_t" if r["seed"] == "pooled" else "bootstrap")
        if r["seed"] == "pooled":  # headline rows: one exploratory Holm family over tasks x models
            assert r["family"] == "exploratory" and 0 < r["holm_p"] <= 1
        else:
            assert r["family"] == "diagnostic" and "holm_p" not in r
    csv_rows = ci_table.read_csv(out)
    assert csv_rows[0]["task"] and set(ci_table.REG_COLUMNS) <= set(csv_rows[0])
    with pytest.raises(MathptError, match="'base'"):
        ci_table.build_regressions_table({"sft": per_doc["sft"]}, out, meta, n_resamples=R)


def test_naming_helpers():
    assert ci_table.parse_model_name("grpo_clip-seed3") == ("grpo_clip", 3)
    assert ci_table.parse_model_name("base") == ("base", None)
    assert ci_table.group_runs({"base": "b", "sft-seed0": "s0", "sft-seed1": "s1"}) == {
        "base": {None: "b"},
        "sft": {0: "s0", 1: "s1"},
    }
    assert ci_table.declared_comparisons(["base", "no_baseline", "grpo_clip"]) == [
        ("no_baseline", "base"),
        ("grpo_clip", "base"),
        ("grpo_clip", "no_baseline"),
    ]
    four = ["base", "sft", "no_baseline", "reinforce_with_baseline", "grpo_clip"]
    assert len(ci_table.declared_comparisons(four)) == 10  # 4 primary, 4 vs base, 2 other PG pairs
    # primary: each PG vs SFT + 1; each trained vs base; PG pairs minus the primary one
    n_pg = len(ci_table.PG_ALGOS)
    expected = (n_pg + 1) + len(ci_table.ALGOS) + n_pg * (n_pg - 1) // 2 - 1
    assert len(ci_table.declared_comparisons(["base", *ci_table.ALGOS])) == expected


def test_accuracy_table_kshot_column(tmp_path, evals):
    """Eval rows carrying the secondary k-shot grade give acc_kshot with its own CI; `acc` stays primary."""
    paths, scores = evals
    rng = np.random.default_rng(3)
    kshot = {}
    for model, seeds in paths.items():
        for s, path in seeds.items():
            rows = [json.loads(line) for line in open(path)]
            k = rng.random(N) < 0.3
            for r in rows:
                r["kshot_correct"] = bool(k[r["index"]])
            open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
            kshot[(model, s)] = k.astype(float)
    rows = ci_table.build_accuracy_table(paths, tmp_path / "acc.csv", META, n_resamples=R)
    r = next(r for r in rows if (r["model"], r["seed"]) == ("sft", 1))
    k = int(kshot[("sft", 1)].sum())
    assert r["acc"] == pytest.approx(scores[("sft", 1)].mean()) and r["acc_kshot"] == pytest.approx(k / N)
    assert (r["kshot_ci_low"], r["kshot_ci_high"]) == pytest.approx(stats.wilson_ci(k, N))
    pooled = next(r for r in rows if (r["model"], r["seed"]) == ("sft", "pooled"))
    ref = stats.seeds_problems_interval(np.stack([kshot[("sft", 0)], kshot[("sft", 1)]]))
    assert (pooled["acc_kshot"], pooled["kshot_ci_low"]) == pytest.approx((ref["mean"], ref["ci_low"]))
    # the comparison table compares the primary eval only
    ci = ci_table.build_ci_table(paths, tmp_path / "ci.csv", META, n_resamples=R)
    row = next(r for r in ci if (r["model_a"], r["model_b"], r["seed"]) == ("sft", "base", 1))
    assert row["acc_a"] == pytest.approx(scores[("sft", 1)].mean())
