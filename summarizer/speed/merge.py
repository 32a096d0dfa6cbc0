"""A dense copy of a (4-bit) LoRA model for generation: the adapter merged into bf16 weights, since
a 4-bit model decodes several times slower.
"""

from __future__ import annotations

import logging

import torch

from summarizer import compat
from summarizer.model import resolve_dtype

log = logging.getLogger(__name__)


def merged_for_generation(lm, dtype: torch.dtype | None = None):
    """A dense copy of a (Q)LoRA model for fast generation, made in place: each 4/8-bit weight
    dequantized, the adapter's B@A added, plain `nn.Linear` layers in the compute dtype.

    A 4-bit PeftModel decodes ~8x slower (dequantize + adapter branch at every step). Dequantizing
    the weights the adapter was trained on (rather than reloading the original bf16 ones) keeps
    what the model learnt: the outputs follow the QLoRA model's. The model cannot train after this.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    dtype = dtype or resolve_dtype("auto")
    replaced: list[str] = []
    for name, module in list(inner.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a layer already made dense (its base_layer, lora_A/B)
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = _dense_weight(layer, dequantize_bnb_weight)
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
        elif _is_bnb_linear(module):
            layer = module
            weight = _dense_weight(module, dequantize_bnb_weight)
        else:
            continue
        dense = torch.nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=layer.bias is not None,
            dtype=dtype,
            device=weight.device,
        )
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent) if parent else inner, child, dense)
        replaced.append(name)
    with torch.no_grad():  # norms and embeddings were kept in fp32 for k-bit training
        for param in inner.parameters():  # (buffers such as RoPE frequencies stay as they are)
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
            param.requires_grad_(False)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(inner, flag, False):
            setattr(inner, flag, False)
    inner.hf_quantizer = None
    return inner.eval()


def _is_bnb_linear(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(module, "weight")


def _dense_weight(layer, dequantize) -> torch.Tensor:
    if not _is_bnb_linear(layer):
        return layer.weight.detach().float()
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward on a CPU
        # (bitsandbytes 0.50): undo that layout before dequantizing, as its own .cuda() does.
        from bitsandbytes.functional import dequantize_4bit

        data, state = compat.unpack_cpu_4bit(layer.weight.data, state)
        return dequantize_4bit(data, state).float()
    return dequantize(layer.weight, getattr(layer, "state", None)).float()
