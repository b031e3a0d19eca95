"""Inference engines behind one small interface (see ``base.py``): ``vllm`` and ``hf``.

``base`` holds the types and helpers both engines share and imports neither; the engines import
``base``; ``make_engine`` (here) imports the one asked for, when asked, so vLLM loads only for ``vllm``.
"""

from mathpt.engines.base import Generation, InferenceEngine, SamplingConfig

__all__ = ["Generation", "InferenceEngine", "SamplingConfig", "make_engine"]


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
