"""LoRA dropout without stored masks or dropped copies (train.lora_dropout_recompute).

peft computes `lora_B(lora_A(dropout(x))) * scaling` with modules, so autograd keeps, for every
adapted projection, its own dropout mask and its own dropped copy of the input (lora_A's saved
input): q, k and v read the same x and keep three of each. For a Llama-3.2-1B decoder layer
autograd then holds ~136 KB per token on CUDA against ~99 here (benchmarks/lean_lora_memory.py). Here
the adapter branch is one autograd function that keeps x itself (one tensor, however many
projections read it) and a seed; the backward draws the same mask again from that seed.
Same function, same gradients for the same mask; the masks come from another generator than
nn.Dropout's, so runs are not bit-identical to peft's. Only while training: eval, saving and
generation use peft's own forward.
"""

from __future__ import annotations

import contextlib
import types

import torch
from peft.tuners.lora.layer import LoraLayer

_generators: dict[torch.device, torch.Generator] = {}


def _keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout mask scaled by 1/(1-p), in x's dtype: the same one for the same seed."""
    gen = _generators.get(x.device)
    if gen is None:
        gen = _generators[x.device] = torch.Generator(x.device)
    gen.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(1 - p, generator=gen).mul_(1 / (1 - p))


class _DropoutLoRA(torch.autograd.Function):
    """lora_B(lora_A(dropout(x))) * scaling, computed in `dtype`, saving x, the weights, the
    rank-r activations and a seed (not the mask and the dropped x)."""

    @staticmethod
    def forward(ctx, x, a, b, p: float, scaling: float, seed: int, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            xt = x.to(dtype)
            xd = xt * _keep(xt, p, seed)
            h = xd @ a.to(dtype).t()
            out = (h @ b.to(dtype).t()) * scaling
        ctx.save_for_backward(x, a, b, h)
        ctx.p, ctx.scaling, ctx.seed, ctx.dtype = p, scaling, seed, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(dtype) * ctx.scaling
            xt = x.to(dtype)
            keep = _keep(xt, ctx.p, ctx.seed)
            gh = g @ b.to(dtype)
            grad_b = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
            xd = xt * keep
            grad_a = gh.reshape(-1, gh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
            grad_x = (gh @ a.to(dtype)) * keep
        return grad_x.to(x.dtype), grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None, None


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's forward while training: base layer + _DropoutLoRA (peft's own otherwise)."""
    if not self.training or self.disable_adapters or self.merged or kwargs.get("adapter_names"):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    on = torch.is_autocast_enabled(x.device.type)
    # peft's dtypes: under autocast the autocast dtype, else the adapter weights' dtype
    dtype = torch.get_autocast_dtype(x.device.type) if on else lora_a.weight.dtype
    # from the CPU generator, which gradient checkpointing restores before recomputing a layer
    seed = int(torch.randint(0, 2**62, (1,)))
    p, scaling = self.lora_dropout[name].p, self.scaling[name]
    out = _DropoutLoRA.apply(x, lora_a.weight, lora_b.weight, p, scaling, seed, dtype)
    return result + out.to(result.dtype)


def _eligible(module) -> bool:
    """Plain LoRA on a linear layer: one adapter, no DoRA/variant, no lora_B bias, dropout > 0."""
    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    if len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    drop = module.lora_dropout[name]
    return (
        isinstance(module.lora_A[name], torch.nn.Linear)
        and module.lora_B[name].bias is None
        and isinstance(drop, torch.nn.Dropout)
        and drop.p > 0
    )


@contextlib.contextmanager
def dropout_recompute(model, on: bool = True):
    """While training: every eligible LoRA layer of `model` takes _DropoutLoRA; peft's own forward
    again afterwards (the instance attribute is removed). Yields the number of layers changed."""
    layers = [m for m in model.modules() if on and _eligible(m)]
    for m in layers:
        m.forward = types.MethodType(_lean_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward
