"""bench/bench_logprob_modes.py (issue 28.1): one command measures each log-prob request at one shape."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_logprob_modes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_logprob_modes", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_modes_are_the_ones_this_vllm_accepts(bench):
    """A mode the installed vLLM does not know would fail only after an engine start: check up front."""
    from typing import get_args

    from vllm.config.model import LogprobsMode

    assert set(bench.MODES) == set(get_args(LogprobsMode))


def test_variants_ask_vllm_for_what_their_names_say(bench):
    for name, (logprobs, flat, detok) in bench.VARIANTS.items():
        p = bench.sampling_params(name, 7)
        assert (p.logprobs, p.flat_logprobs, p.detokenize) == (logprobs, flat, detok)
        assert (
            ("lp0" in name) == (logprobs == 0) and ("flat" in name) == flat and ("nodetok" in name) != detok
        )
        assert p.ignore_eos and p.max_tokens == p.min_tokens == 7 and p.temperature == 1.0


def test_table_compares_against_the_default_engines_nolp(bench):
    def row(mode, variant, tps):
        lp, flat, detok = bench.VARIANTS[variant]
        return dict(
            mode=mode,
            variant=variant,
            logprobs=lp,
            flat_logprobs=flat,
            detokenize=detok,
            tok_per_s=tps,
            seconds=1.0,
        )

    text = bench.table([row("raw_logprobs", "nolp", 30000.0), row("processed_logits", "lp0_flat", 15000.0)])
    assert "| raw_logprobs | nolp | None | False | True | 30,000 | 1.00 | 1.00 |" in text
    assert "| processed_logits | lp0_flat | 0 | True | True | 15,000 | 1.00 | 0.50 |" in text


def test_unknown_mode_or_variant_is_refused_before_any_engine(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--modes", "raw_logprob"])
    assert "--modes: unknown ['raw_logprob']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--variants", "lp1"])


@pytest.mark.slow
def test_cpu_smoke_measures_each_variant_at_the_forced_length(bench, capsys):
    rows = bench.main(
        ["--tiny", "--modes", "raw_logprobs", "--variants", "nolp,lp0_flat_nodetok", "--prompts", "4"]
        + ["--max-tokens", "8"]
    )
    assert [(r["mode"], r["variant"]) for r in rows] == [
        ("raw_logprobs", "nolp"),
        ("raw_logprobs", "lp0_flat_nodetok"),
    ]
    assert all(r["tokens"] == 4 * 8 and r["tok_per_s"] > 0 for r in rows)
    assert "| raw_logprobs | lp0_flat_nodetok | 0 | True | False |" in capsys.readouterr().out
