"""Regional `torch.compile` of the decoder layers while training (train.compile)."""

from __future__ import annotations

import contextlib
import logging

import torch

from summarizer import compat
from summarizer.errors import UserError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def compiled_layers(model, on: bool = True):
    """Regional compilation while training: torch.compile on each repeated decoder layer, in place
    (module names and state dict unchanged, so checkpoints and adapters are too); embeddings, LM
    head and loss stay eager. The layers share one compiled code; shapes are dynamic (packed rows
    vary in length). Eager again afterwards: generation has other shapes and its own CUDA graphs."""
    if not on:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(
            f"train.compile=true: no decoder layers (.model.layers) in {type(base).__name__}"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("train.compile: %d decoder layers, compiled on the first steps", len(layers))
    try:
        yield
    finally:
        for layer in layers:
            compat.uncompile(layer)  # back to eager
