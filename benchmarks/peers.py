"""The peers benchmarks/bench.py measures the project against, each configured at its best, and the
figures they are compared by (repeats, model FLOPs utilisation).

Training peers (every one trains the same rows once, LoRA r16 / alpha 32 / dropout 0.05 on the seven
projections of the same 4-bit base, completion-only loss):

  trl_plain            SFTTrainer + peft as a hand-written script does it: padded batches, gradient
                       checkpointing, paged AdamW 32-bit, bf16
  trl_bfd_liger        trl_plain + BFD packing + Liger (named trl_best in results before 2026-12)
  trl_best             TRL at its best on the plain run's batches: padding_free=True (each batch of
                       `batch_size` examples flattened into one row, TRL's collator emitting position
                       ids and cu_seq_lens), the same varlen attention kernel ours trains with
                       (summarizer.speed.packing's `summarizer_varlen`; flash_attention_2 where that
                       kernel is missing and flash-attn is installed), fused AdamW, Liger's kernels,
                       bf16, TRL's chunked LM head (always on in TRL 1.16), gradient checkpointing:
                       matched with ours_batch_ckpt (train=gpu_lean, pack_tokens=0)
  trl_best_nockpt      trl_best without checkpointing: matched with ours_batch (gpu_fast,
                       pack_tokens=0)
  trl_best_bfd         trl_best with BFD packing into rows of batch_size x max_length tokens, one
                       row a step (as ours packs): matched with ours_ckpt (gpu_lean)
  trl_best_bfd_nockpt  trl_best_bfd without checkpointing: matched with ours (gpu_fast)
  unsloth              FastLanguageModel (4-bit, the same LoRA, use_gradient_checkpointing="unsloth")
                       trained by TRL's SFTTrainer with trl_best's options; matched with
                       ours_batch_ckpt. Reported as not installed where unsloth is not.

Model FLOPs utilisation (MFU): model FLOPs per second over the GPU's peak dense bf16 FLOPs. A
token's model FLOPs in LoRA training of a frozen base are
    4 N + 6 N_lora + 4 V d [if the token is supervised] + 6 L H_q d_head n
with N the decoder layers' matmul parameters (forward 2N, backward to the activations 2N: the
frozen weights get no gradient), N_lora the adapters' parameters (forward, activation and weight
gradients: 6 N_lora), the frozen LM head (V x d) run only where a label follows (every peer computes
the completion-only loss there), and causal attention over the token's own example of n tokens
(QK^T and AV, half the n x n square, forward + backward = 3x the forward's 2 L H_q d_head n).
Gradient checkpointing's recompute is not model work and is not counted (MFU, not hardware FLOPs
utilisation). Peak: PEAK_TFLOPS by device name, or --peak-tflops.
"""

from __future__ import annotations

import importlib.util
import statistics

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16

# SFTConfig settings of each TRL variant beyond what every variant shares (bench_overrides).
TRL = {
    "trl_plain": {"best": False, "packing": False, "ckpt": True},
    "trl_bfd_liger": {"best": False, "packing": True, "ckpt": True},
    "trl_best": {"best": True, "packing": False, "ckpt": True},
    "trl_best_nockpt": {"best": True, "packing": False, "ckpt": False},
    "trl_best_bfd": {"best": True, "packing": True, "ckpt": True},
    "trl_best_bfd_nockpt": {"best": True, "packing": True, "ckpt": False},
}
# ours variant -> the TRL (or unsloth) variant with the same steps and checkpointing
MATCHED = {
    "ours_batch_ckpt": "trl_best",
    "ours_batch": "trl_best_nockpt",
    "ours_ckpt": "trl_best_bfd",
    "ours": "trl_best_bfd_nockpt",
}
UNSLOTH_MATCHED = {"ours_batch_ckpt": "unsloth"}

# Peak dense bf16 tensor FLOPs (no sparsity), TFLOP/s, by a substring of
# torch.cuda.get_device_name(); the first that matches wins (more specific names first).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 6000 Ada", 364.0),
]


class NotInstalled(Exception):
    """A peer whose package is not installed: reported, not failed."""


# --- FLOPs ---------------------------------------------------------------------------------------


def model_dims(spec: dict) -> dict:
    d = spec["hidden_size"]
    heads = spec["num_attention_heads"]
    head_dim = spec.get("head_dim") or d // heads
    kv = spec.get("num_key_value_heads", heads)
    inter = spec["intermediate_size"]
    # (in, out) of the seven projections
    shapes = {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv * head_dim),
        "v_proj": (d, kv * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    layers = spec["num_hidden_layers"]
    return {
        "layers": layers,
        "hidden": d,
        "vocab": spec["vocab_size"],
        "attn_width": heads * head_dim,
        "N": layers * sum(i * o for i, o in shapes.values()),
        "N_lora": layers * sum(LORA_R * (i + o) for i, o in shapes.values()),
    }


def flops_per_token(spec: dict, rows: list[dict]) -> dict:
    """Mean model FLOPs per token of one pass over `rows` (prompt + completion lists of ids), by the
    formula in this module's docstring."""
    m = model_dims(spec)
    tokens = supervised = attention = 0
    for r in rows:
        n = len(r["prompt"]) + len(r["completion"])
        tokens += n
        supervised += len(r["completion"])  # each completion token is a label of its position - 1
        attention += n * n
    dense = (4 * m["N"] + 6 * m["N_lora"]) * tokens
    head = 4 * m["vocab"] * m["hidden"] * supervised
    # per example and layer: QK^T and AV over half the n x n square (causal) = 2 W n^2 forward,
    # x 3 with the backward; per token 6 L W n
    attn = 6 * m["layers"] * m["attn_width"] * attention
    total = dense + head + attn
    return {
        "flops_per_token": total / max(tokens, 1),
        "parameters_matmul": m["N"],
        "parameters_lora": m["N_lora"],
        "share_dense": dense / total if total else None,
        "share_lm_head": head / total if total else None,
        "share_attention": attn / total if total else None,
        "formula": "4N + 6N_lora + 4Vd (supervised tokens) + 6 L H_q d_head n (causal attention)",
    }


def peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def add_mfu(figures: dict, per_token: float, peak: float | None) -> None:
    """MFU of each tokens/s figure (steady and whole run, and their min/median/max)."""
    for key in list(figures):
        if key.startswith("tokens_per_second") and isinstance(figures[key], (int, float)):
            value = figures[key] * per_token / (peak * 1e12) if peak else None
            figures["mfu" + key[len("tokens_per_second") :]] = value


# --- repeats -------------------------------------------------------------------------------------

RATES = ("tokens_per_second", "tokens_per_second_whole_run", "tokens_per_second_incl_capture")


def summarise(runs: list[dict]) -> dict:
    """One variant's figures over its repeats: the first repeat's figures (step lists included),
    each rate as the median with its min and max, the largest peak memory, every repeat's scalars."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0] if runs else {"error": "no repeat ran"}
    out = dict(ok[0])
    for key in RATES:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
    peaks = [r["peak_gib"] for r in ok if r.get("peak_gib") is not None]
    if peaks:
        out["peak_gib"] = max(peaks)
    losses = [r["eval_loss"] for r in ok]
    out["eval_loss_spread"] = max(losses) - min(losses)
    out["repeats"] = len(ok)
    out["repeat_errors"] = [r["error"] for r in runs if "error" in r]
    out["per_repeat"] = [
        {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for r in ok
    ]
    return out


# --- TRL -----------------------------------------------------------------------------------------


def trl_config(variant: str, args, out, overrides: dict, on_gpu: bool):
    """The SFTConfig of a TRL variant (TRL)."""
    from trl import SFTConfig

    spec = TRL[variant]
    o = overrides
    extra = {}
    batch, max_length = o["batch_size"], o["max_length"]
    if spec["packing"]:
        extra.update(packing=True, packing_strategy="bfd")
        if spec["best"]:  # bins of batch x max_length tokens, one a step: ours' row budget
            batch, max_length = 1, o["batch_size"] * o["max_length"]
    elif spec["best"]:
        # padding-free on the plain batches: the rows are already cut to max_length, and TRL
        # enforces it only when packing (max_length=None, or it refuses)
        extra.update(padding_free=True)
        max_length = None
    if (spec["best"] or spec["packing"]) and liger_available():
        extra["use_liger_kernel"] = True
    if spec["best"]:
        optim = "adamw_torch_fused"
    else:
        optim = "paged_adamw_32bit" if on_gpu else "adamw_torch"
    ckpt = {}
    if spec["ckpt"]:
        ckpt = dict(
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        ckpt = dict(gradient_checkpointing=False)
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=max_length,
        learning_rate=o["lr"],
        lr_scheduler_type=o["scheduler"],
        warmup_steps=o["warmup_ratio"],
        num_train_epochs=1,
        max_steps=o["max_steps"],
        bf16=on_gpu,
        optim=optim,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not on_gpu,
        seed=42,
        **ckpt,
        **extra,
    )


def trl_dataset(train_rows):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r["prompt"] + r["completion"] for r in train_rows],
            "completion_mask": [
                [0] * len(r["prompt"]) + [1] * len(r["completion"]) for r in train_rows
            ],
        }
    )


def peft_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R, lora_alpha=32, lora_dropout=0.05, target_modules=SEVEN, task_type="CAUSAL_LM"
    )


def trl_attention(base, variant: str) -> str:
    """The attention a TRL variant trains with: the best ones get ours' varlen kernel (TRL's
    padding-free collator hands it cu_seq_lens), else flash_attention_2 where flash-attn is
    installed; on CPU, sdpa, which transformers masks per example from the position ids."""
    import torch

    from summarizer.speed import packing

    if not TRL[variant]["best"]:
        return "sdpa"
    if packing.varlen_available():
        packing.register()
        base.set_attn_implementation(packing.ATTENTION)
        return packing.ATTENTION
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        base.set_attn_implementation("flash_attention_2")
        return "flash_attention_2"
    return "sdpa"


def trl_trainer(variant, base, tokenizer, train_rows, args, out, meter, overrides):
    """(SFTTrainer, attention implementation) for a TRL variant."""
    import torch
    from trl import SFTTrainer

    on_gpu = torch.cuda.is_available()
    attention = trl_attention(base, variant)
    trainer = SFTTrainer(
        model=base,
        args=trl_config(variant, args, out, overrides, on_gpu),
        train_dataset=trl_dataset(train_rows),
        processing_class=tokenizer,
        peft_config=peft_config(),
        callbacks=[meter],
    )
    return trainer, attention


def restore_attention(lm) -> None:
    """sdpa again after training: the varlen kernel needs packed rows, the held-out loss and
    generation run padded batches."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if getattr(inner.config, "_attn_implementation", "sdpa") != "sdpa":
        inner.set_attn_implementation("sdpa")


def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


# --- unsloth -------------------------------------------------------------------------------------


def unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def unsloth_trainer(path, tokenizer, train_rows, args, out, meter, overrides):
    """(SFTTrainer, model) for unsloth: FastLanguageModel loads the same local folder in 4-bit with
    the same LoRA; TRL's SFTTrainer (which unsloth patches at import) with trl_best's options."""
    if not unsloth_available():
        raise NotInstalled("unsloth is not installed")
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no stats download at load
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from trl import SFTTrainer
    from unsloth import FastLanguageModel  # imported first by bench.import_unsloth_first

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(path),
        max_seq_length=overrides["max_length"],
        dtype=torch.bfloat16,
        load_in_4bit=True,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA_R,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=SEVEN,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )
    config = trl_config("trl_best", args, out, overrides, on_gpu=True)
    config.use_liger_kernel = False  # unsloth has its own kernels
    config.gradient_checkpointing = False  # unsloth checkpoints itself ("unsloth" offloading)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(train_rows),
        processing_class=tokenizer,
        callbacks=[meter],
    )
    return trainer, model


def unsloth_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("unsloth", "unsloth_zoo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
