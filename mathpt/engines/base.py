"""The interface every inference engine implements.

An engine generates from prompts with given sampling parameters and returns text, token ids and
per-token log-probs; it takes new weights in memory and reports which weight version it is using,
so every result can be tagged with the exact weights that produced it.

The engines import this module (types and the stop-string helpers they share); it imports neither
engine. ``mathpt.engines.make_engine`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

# A prompt is text, or token ids (the worker's vLLM may run without a tokenizer).
Prompt = str | Sequence[int]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters shared by all engines. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True  # return the sampled tokens' log-probs
    # one seed per output row (prompt-major: prompt i, sample j -> i * n + j); overrides ``seed``, so
    # every sample has its own reproducible noise stream (rollouts: see ``train.pg.sample_seeds``)
    seeds: tuple[int, ...] | None = None

    def row_seeds(self, n_prompts: int) -> tuple[int, ...] | None:
        """``seeds``, checked against the number of output rows."""
        if self.seeds is not None and len(self.seeds) != n_prompts * self.n:
            raise ValueError(f"{len(self.seeds)} seeds for {n_prompts} prompts x n={self.n} samples")
        return self.seeds


@dataclass
class Generation:
    """One completion of one prompt."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"
    weight_version: int
    prompt_token_ids: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class InferenceEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[str], params: SamplingConfig) -> list[Generation]:
        """Generations ordered by (prompt_index, sample_index); ``n`` per prompt."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the model weights (HF parameter names) and set ``weight_version``."""
        ...

    def close(self) -> None: ...


def split_stops(stop: Iterable[str], tokenizer) -> tuple[list[str], list[int]]:
    """Split stop strings into (text stops, stop token ids): a stop equal to one special token is an id.

    Special tokens are dropped from decoded text, so a text match on them would never fire.
    """
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts, ids = [], []
    for s in stop:
        if s in special:
            ids.append(int(tokenizer.convert_tokens_to_ids(s)))
        else:
            texts.append(s)
    return texts, ids


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """Truncate ``text`` right after the earliest stop string (kept in the text)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return (text, False) if best is None else (text[:best], True)
