"""The interface every inference engine implements.

An engine generates from prompts with given sampling parameters and returns text, token ids and
per-token log-probs; it takes new weights in memory and reports which weight version it is using,
so every result can be tagged with the exact weights that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


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


def make_engine(name: str, model_path: str, **kwargs) -> InferenceEngine:
    """Build an engine by name: ``vllm`` (the real one) or ``hf`` (transformers generate)."""
    from mathpt import timing

    if name == "vllm":
        from mathpt.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_path, **kwargs)  # marks "imports" once vLLM is imported
    elif name == "hf":
        import transformers  # noqa: F401 - timed as the engine's imports

        from mathpt.engines.hf_engine import HFEngine

        timing.mark("imports")
        engine = HFEngine(model_path, **kwargs)
    else:
        raise ValueError(f"unknown engine {name!r}: expected 'vllm' or 'hf'")
    timing.mark("engine_ready")
    return engine
