"""Regional compilation of a model's decoder layers, the speed knob ``load_policy`` turns on when
training on CUDA."""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (``model.model.layers``)."""
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to compile or checkpoint")
    return list(layers)


def compile_layers(model: torch.nn.Module, dynamic: bool = True) -> None:
    """torch.compile each decoder layer in place ("regional" compilation).

    All layers share one compiled graph, so compiling takes about as long as for one layer, and
    inductor fuses norms/rotary/SwiGLU and recomputes cheap elementwise ops in backward instead of
    saving them (less activation memory). ``dynamic`` avoids a recompile per sequence length.
    """
    for layer in decoder_layers(model):
        layer.compile(dynamic=dynamic)


def compile_if_cuda(model: torch.nn.Module) -> bool:
    """``compile_layers`` when ``model`` is on CUDA (the trainer's speed knob); returns whether it did.

    Every model whose log-probs enter the same ratio goes through here (the policy in
    ``load_policy`` and the behaviour copy in ``train/pg.py``), so numerator and denominator run
    the same compiled kernels.
    """
    if next(model.parameters()).device.type != "cuda":
        return False
    compile_layers(model)
    return True
