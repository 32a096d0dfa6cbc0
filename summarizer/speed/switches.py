"""Each speed switch's auto | true | false setting resolved against the machine and the config:
auto turns a switch on where it applies, true insists (a one-line error names what is in the way).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from summarizer import distributed
from summarizer.config import GenerateConfig, TrainConfig
from summarizer.errors import UserError
from summarizer.speed.static_decode import STATIC_ATTENTION

log = logging.getLogger(__name__)


def use_liger(cfg: TrainConfig) -> bool:
    """train.liger: auto = on a CUDA GPU when liger-kernel is installed; true insists on both.
    Off under train.compile: dynamo cannot trace Liger's Triton kernels (it fails on them), and
    inductor fuses the norms, activations and rotary embeddings itself."""
    choice = str(cfg.liger).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"train.liger={cfg.liger!r}: expected auto, true or false")
    if choice == "true" and cfg.compile:
        raise UserError(
            "train.liger=true and train.compile=true do not combine (torch.compile cannot trace "
            "Liger's Triton kernels and fuses those layers itself): set train.liger=auto or false"
        )
    if choice == "false" or cfg.compile:
        return False
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if choice == "true" and not available:
        raise UserError(
            "train.liger=true needs a CUDA GPU and the liger-kernel package "
            "(pip install liger-kernel==0.8.5); use train.liger=auto or false"
        )
    return available


def use_fused_head(cfg: TrainConfig) -> bool:
    """train.fused_lm_head: auto = on CUDA with gradient checkpointing, where memory is what the run
    buys: on a 1B shape at 8k tokens a step it cut peak memory 3.67 -> 2.71 GiB, and without
    checkpointing 17.6 -> 15.8 GiB for 8 % fewer tokens/s (benchmarks/RESULTS.md). Off CUDA TRL's
    chunked head projects every position (~3x slower than our logits_to_keep on CPU)."""
    choice = str(cfg.fused_lm_head).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"train.fused_lm_head={cfg.fused_lm_head!r}: expected auto, true or false")
    if choice == "auto":
        return torch.cuda.is_available() and cfg.gradient_checkpointing
    return choice == "true"


def use_cuda_graph(cfg: TrainConfig) -> bool:
    """train.cuda_graph: auto = on where the graph applies (below); true insists, naming what is in
    the way. A graph replays fixed shapes and fixed memory with no host work, so it needs packed
    rows (each padded to one static shape), a CUDA GPU and one process, and excludes what varies
    per step on the host or is unverified under capture."""
    choice = str(cfg.cuda_graph).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"train.cuda_graph={cfg.cuda_graph!r}: expected auto, true or false")
    if choice == "false":
        return False
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    conflicts = [
        (not torch.cuda.is_available(), "a CUDA GPU"),
        (not cfg.packing, "train.packing=true (packed rows)"),
        (cfg.compile, "train.compile=false"),
        # its seeds come from the host: a graph would replay the same masks every step
        (cfg.lora_dropout_recompute, "train.lora_dropout_recompute=false"),
        (
            cfg.precision == "fp16" or (cfg.precision == "auto" and not bf16),
            "train.precision bf16 or fp32 (fp16's loss scaling checks for inf on the host)",
        ),
        (distributed.world_size() > 1, "one process (not trainer=ddp)"),
    ]
    missing = [need for bad, need in conflicts if bad]
    if choice == "true" and missing:
        raise UserError(f"train.cuda_graph=true needs {missing[0]}; or set train.cuda_graph=auto")
    return not missing


def use_merged(cfg: GenerateConfig, quant) -> bool:
    """Whether to generate with a merged bf16 copy of the model (see GenerateConfig.merge)."""
    choice = str(cfg.merge).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"generate.merge={cfg.merge!r}: expected auto, true or false")
    if choice == "auto":
        return torch.cuda.is_available() and quant.method != "none"
    return choice == "true"


def use_static(cfg: GenerateConfig, device: torch.device, attention: str = "sdpa") -> bool:
    """Whether to decode with `greedy_static` (see GenerateConfig.static_decode)."""
    choice = str(cfg.static_decode).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(
            f"generate.static_decode={cfg.static_decode!r}: expected auto, true or false"
        )
    plain_greedy = (
        cfg.num_beams == 1
        and not cfg.do_sample
        and cfg.repetition_penalty == 1.0
        and cfg.no_repeat_ngram_size == 0
        and (cfg.stop_at_newline or not cfg.stop_at_blank_line)
    )
    if choice == "true" and not plain_greedy:
        raise UserError(
            "generate.static_decode=true does greedy decoding only: it needs num_beams=1, "
            "do_sample=false, repetition_penalty=1.0, no_repeat_ngram_size=0 and no "
            "stop_at_blank_line"
        )
    if choice == "true" and attention not in STATIC_ATTENTION:
        raise UserError(
            f"generate.static_decode=true needs model.attn_implementation sdpa or eager, "
            f"not {attention!r}"
        )
    if choice == "auto":
        return plain_greedy and device.type == "cuda" and attention in STATIC_ATTENTION
    return choice == "true"
