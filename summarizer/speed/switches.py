"""The speed switches of a run, resolved once into a frozen plan the stages read.

Each switch is `auto | true | false` (parsed by `setting`, the one place that reads them): auto
turns it on where it applies on this machine and config, true insists (a one-line error names what
is in the way), false keeps it off. `train_plan` and `generate_plan` resolve them, with the other
machine-dependent choices (precision, optimizer), before the model loads; `summarizer.plan.make`
calls them for a run and the stages only read the result. A new switch is a field of a plan, its
resolver here, and its use in the stage.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from summarizer.config import GenerateConfig, TrainConfig
from summarizer.errors import UserError
from summarizer.speed.static_decode import STATIC_ATTENTION

log = logging.getLogger(__name__)

SETTINGS = ("auto", "true", "false")
# transformers' SchedulerType values (train.scheduler), listed here so that a typo fails in
# preflight rather than when the Trainer builds its optimizer, after the model has loaded
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)  # fmt: skip


def setting(value, key: str) -> str:
    """A switch's value as auto, true or false (YAML may hand over a bool); else a one-line error."""
    choice = str(value).lower()
    if choice not in SETTINGS:
        raise UserError(f"{key}={value!r}: expected auto, true or false")
    return choice


@dataclass(frozen=True)
class TrainPlan:
    precision: str  # fp32 | bf16 | fp16 (train.precision=auto resolved)
    optim: str  # the HF optimizer name (train.optim=auto resolved)
    liger: bool  # Liger's Triton kernels patched in (train.liger)
    fused_lm_head: bool  # the loss through TRL's chunked LM head (train.fused_lm_head)
    cuda_graph: bool  # forward + backward replayed as CUDA graphs (train.cuda_graph)
    cuda_graph_required: bool  # train.cuda_graph=true: a step that cannot be captured is an error


STRATEGIES = ("auto", "greedy", "beam", "sample", "mbr")


@dataclass(frozen=True)
class GeneratePlan:
    merged: bool  # generate with a merged bf16 copy of a quantized model (generate.merge)
    static: bool  # decoding with a static KV cache and CUDA graphs (generate.static_decode)
    strategy: str = "greedy"  # greedy | beam | sample | mbr (generate.strategy=auto resolved)


def precision(cfg: TrainConfig) -> str:
    on_gpu = torch.cuda.is_available()
    choice = cfg.precision
    if choice == "auto":
        choice = (
            "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp16" if on_gpu else "fp32"
        )
    if choice not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision={cfg.precision!r}: expected auto, fp32, bf16 or fp16")
    return choice


def train_plan(cfg: TrainConfig, world_size: int = 1) -> TrainPlan:
    """The training settings checked and every auto switch resolved, before the model loads."""
    if cfg.lr <= 0:
        raise UserError(f"train.lr={cfg.lr} must be > 0")
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        raise UserError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.eval_strategy not in ("steps", "epoch", "no"):
        raise UserError(f"train.eval_strategy={cfg.eval_strategy!r}: expected steps, epoch or no")
    if cfg.pack_tokens is not None and cfg.pack_tokens < 0:
        raise UserError(f"train.pack_tokens={cfg.pack_tokens}: expected null, 0 or a token count")
    if cfg.scheduler not in SCHEDULERS:
        raise UserError(
            f"train.scheduler={cfg.scheduler!r}: expected one of {', '.join(SCHEDULERS)}"
        )
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise UserError(f"train.max_steps={cfg.max_steps}: expected -1 (train.epochs) or >= 1")
    if cfg.max_steps == -1 and cfg.epochs <= 0:
        raise UserError(f"train.epochs={cfg.epochs}: expected > 0 (or train.max_steps >= 1)")
    for key in ("save_steps", "logging_steps") + (
        ("eval_steps",) if cfg.eval_strategy == "steps" else ()
    ):
        if getattr(cfg, key) < 1:
            raise UserError(f"train.{key}={getattr(cfg, key)}: expected a step count >= 1")
    if cfg.pack_multiple < 1:
        raise UserError(f"train.pack_multiple={cfg.pack_multiple}: expected a token count >= 1")
    early_stop = cfg.eval_strategy != "no" and cfg.early_stopping_patience > 0
    if early_stop and cfg.eval_strategy == "steps" and cfg.save_steps % cfg.eval_steps:
        raise UserError(
            f"train.save_steps={cfg.save_steps} must be a multiple of train.eval_steps={cfg.eval_steps} "
            "for early stopping to keep the best checkpoint"
        )
    on_gpu = torch.cuda.is_available()
    return TrainPlan(
        precision=precision(cfg),
        optim=cfg.optim
        if cfg.optim != "auto"
        else ("paged_adamw_32bit" if on_gpu else "adamw_torch"),
        liger=use_liger(cfg),
        fused_lm_head=use_fused_head(cfg),
        cuda_graph=use_cuda_graph(cfg, world_size),
        cuda_graph_required=setting(cfg.cuda_graph, "train.cuda_graph") == "true",
    )


def generate_plan(
    cfg: GenerateConfig, quant, device: torch.device, attention: str = "sdpa"
) -> GeneratePlan:
    """quant: the model's quantization (None: the model at hand is what generates)."""
    merged = use_merged(cfg, quant) if quant is not None else False
    return GeneratePlan(
        merged=merged, static=use_static(cfg, device, attention), strategy=strategy(cfg)
    )


def strategy(cfg: GenerateConfig) -> str:
    """generate.strategy with auto resolved, its settings checked. auto keeps the older keys'
    meaning (num_beams > 1: beam search, do_sample=true: sampling, both: beam sampling); a named
    strategy is what runs, and an older key set against it is an error naming both."""
    choice = str(cfg.strategy).lower()
    if choice not in STRATEGIES:
        raise UserError(f"generate.strategy={cfg.strategy!r}: expected {', '.join(STRATEGIES)}")
    if choice == "auto":
        choice = "beam" if cfg.num_beams > 1 else "sample" if cfg.do_sample else "greedy"
    elif choice == "beam" and cfg.num_beams < 2:
        raise UserError(
            f"generate.strategy=beam needs generate.num_beams >= 2 (it is {cfg.num_beams})"
        )
    elif choice != "beam" and cfg.num_beams > 1:
        raise UserError(
            f"generate.strategy={choice} with generate.num_beams={cfg.num_beams}: beams are "
            "generate.strategy=beam (or auto); set generate.num_beams=1"
        )
    elif choice in ("greedy", "mbr") and cfg.do_sample:
        raise UserError(
            f"generate.strategy={choice} with generate.do_sample=true: sampling is "
            "generate.strategy=sample (or auto); set generate.do_sample=false"
        )
    if choice == "sample" or (choice == "beam" and cfg.do_sample):
        given = "generate.do_sample=true" if cfg.do_sample else "generate.strategy=sample"
        _check_sampling("generate", cfg.temperature, cfg.top_p, given)
    if choice == "mbr":
        mbr = cfg.mbr
        if mbr.candidates < 2:
            raise UserError(
                f"generate.mbr.candidates={mbr.candidates}: expected >= 2 (MBR compares "
                "each sampled summary with the others)"
            )
        _check_sampling("generate.mbr", mbr.temperature, mbr.top_p, "generate.strategy=mbr")
        if not 0 <= mbr.epsilon < 1:
            raise UserError(
                f"generate.mbr.epsilon={mbr.epsilon}: expected 0 <= epsilon < 1 (0: off)"
            )
    return choice


def _check_sampling(prefix: str, temperature: float, top_p: float, given: str) -> None:
    if temperature <= 0:
        raise UserError(
            f"{prefix}.temperature={temperature} with {given}: expected > 0 "
            "(or generate.strategy=greedy for greedy decoding)"
        )
    if not 0 < top_p <= 1:
        raise UserError(f"{prefix}.top_p={top_p} with {given}: expected 0 < top_p <= 1")


def use_liger(cfg: TrainConfig) -> bool:
    """train.liger: auto = on a CUDA GPU when liger-kernel is installed; true insists on both.
    Off under train.compile: dynamo cannot trace Liger's Triton kernels (it fails on them), and
    inductor fuses the norms, activations and rotary embeddings itself."""
    choice = setting(cfg.liger, "train.liger")
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
    choice = setting(cfg.fused_lm_head, "train.fused_lm_head")
    if choice == "auto":
        return torch.cuda.is_available() and cfg.gradient_checkpointing
    return choice == "true"


def use_cuda_graph(cfg: TrainConfig, world_size: int = 1) -> bool:
    """train.cuda_graph: auto = on where the graph applies (below); true insists, naming what is in
    the way. A graph replays fixed shapes and fixed memory with no host work, so it needs packed
    rows (each padded to one static shape), a CUDA GPU and one process, and excludes what varies
    per step on the host or is unverified under capture."""
    choice = setting(cfg.cuda_graph, "train.cuda_graph")
    if choice == "false":
        return False
    conflicts = [
        (not torch.cuda.is_available(), "a CUDA GPU"),
        (not cfg.packing, "train.packing=true (packed rows)"),
        (cfg.compile, "train.compile=false"),
        # its seeds come from the host: a graph would replay the same masks every step
        (cfg.lora_dropout_recompute, "train.lora_dropout_recompute=false"),
        (
            precision(cfg) == "fp16",
            "train.precision bf16 or fp32 (fp16's loss scaling checks for inf on the host)",
        ),
        (world_size > 1, "one process (not distributed=ddp)"),
    ]
    missing = [need for bad, need in conflicts if bad]
    if choice == "true" and missing:
        raise UserError(f"train.cuda_graph=true needs {missing[0]}; or set train.cuda_graph=auto")
    return not missing


def use_merged(cfg: GenerateConfig, quant) -> bool:
    """Whether to generate with a merged bf16 copy of the model (see GenerateConfig.merge)."""
    choice = setting(cfg.merge, "generate.merge")
    if choice == "auto":
        return torch.cuda.is_available() and quant.method != "none"
    return choice == "true"


def use_static(cfg: GenerateConfig, device: torch.device, attention: str = "sdpa") -> bool:
    """Whether to decode with `speed.static_decode` (see GenerateConfig.static_decode)."""
    choice = setting(cfg.static_decode, "generate.static_decode")
    plain_greedy = (
        strategy(cfg) in ("greedy", "mbr")
        and cfg.repetition_penalty == 1.0
        and cfg.no_repeat_ngram_size == 0
        and (cfg.stop_at_newline or not cfg.stop_at_blank_line)
    )
    if choice == "true" and not plain_greedy:
        raise UserError(
            "generate.static_decode=true does greedy decoding only (and strategy=mbr's "
            "sampling): it needs num_beams=1, do_sample=false, repetition_penalty=1.0, "
            "no_repeat_ngram_size=0 and no stop_at_blank_line"
        )
    if choice == "true" and attention not in STATIC_ATTENTION:
        raise UserError(
            f"generate.static_decode=true needs model.attn_implementation sdpa or eager, "
            f"not {attention!r}"
        )
    if choice == "auto":
        return plain_greedy and device.type == "cuda" and attention in STATIC_ATTENTION
    return choice == "true"
