"""Inference engines behind one small interface (see ``base.py``): ``vllm`` and ``hf``."""

from mathpt.engines.base import Generation, InferenceEngine, SamplingConfig, make_engine

__all__ = ["Generation", "InferenceEngine", "SamplingConfig", "make_engine"]
