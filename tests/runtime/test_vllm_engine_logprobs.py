"""``sampled_logprobs``: the sampled tokens' log-probs from vLLM's flat or per-position outputs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from mathpt.engines.vllm_engine import sampled_logprobs


@dataclass
class Lp:
    logprob: float


@dataclass
class Flat:
    """The fields of vLLM's FlatLogprobs that the engine reads (one entry per position with logprobs=0)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    per_position: list[dict] = field(default_factory=list)

    def __iter__(self):
        return iter(self.per_position)


def _case(n: int, extra: int, seed: int):
    rng = random.Random(seed)
    toks = [rng.randrange(1000) for _ in range(n)]
    want = [-rng.random() * 10 for _ in range(n)]
    positions = []
    for t, lp in zip(toks, want, strict=True):
        d = {t: Lp(lp)}
        for _ in range(extra):  # top-k alternatives beside the sampled token
            d[rng.randrange(1000, 2000)] = Lp(-rng.random() * 20)
        positions.append(d)
    return toks, want, positions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_and_dict_forms_give_the_sampled_log_probs(seed):
    toks, want, positions = _case(37, 0, seed)
    flat = Flat(token_ids=list(toks), logprobs=list(want), per_position=positions)
    assert sampled_logprobs(flat, toks) == want
    assert sampled_logprobs(positions, toks) == want


def test_flat_with_alternatives_falls_back_to_per_position_lookup():
    toks, want, positions = _case(20, 2, 3)
    # flat lists longer than the response (top-k alternatives): the fast path must not be taken
    flat = Flat(
        token_ids=[t for d in positions for t in d],
        logprobs=[v.logprob for d in positions for v in d.values()],
        per_position=positions,
    )
    assert sampled_logprobs(flat, toks) == want


def test_mismatched_tokens_are_not_read_from_the_flat_lists():
    toks, want, positions = _case(10, 0, 4)
    flat = Flat(token_ids=list(reversed(toks)), logprobs=[0.0] * 10, per_position=positions)
    assert sampled_logprobs(flat, toks) == want
