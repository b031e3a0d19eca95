"""Inference engines behind one small interface (see ``base.py``): ``vllm`` and ``hf``.

``base`` holds the types and helpers both engines share and imports neither; the engines import
``base``; ``make_engine`` (here) imports the one asked for, when asked, so vLLM loads only for ``vllm``.
"""

from mathpt.engines.base import Generation, InferenceEngine, SamplingConfig

__all__ = ["Generation", "InferenceEngine", "SamplingConfig", "make_engine"]


def make_engine(name: str, model_path: str, **kwargs) -> InferenceEngine:
    """Build an engine by name: ``vllm`` (the real one) or ``hf`` (transformers generate)."""
    if name == "vllm":
        from mathpt.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if name == "hf":
        from mathpt.engines.hf_engine import HFEngine

        return HFEngine(model_path, **kwargs)
    raise ValueError(f"unknown engine {name!r}: expected 'vllm' or 'hf'")
