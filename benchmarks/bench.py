"""Training and generation speed: the project's GPU path against its peers at their best, in one run.

    python benchmarks/bench.py --shape llama-1b          # on a GPU machine (make bench)
    python benchmarks/bench.py --shape tiny --cpu-smoke  # the same code on a tiny shape, on CPU

For one model shape (random weights from its config, saved to a local folder and loaded through the
project's normal loader, nf4 QLoRA, LoRA r16 on the seven projections) and the real token lengths
of the Korean dev set (benchmarks/rows.py), it trains the same rows (`--steps` batches of
`--batch-size`, one pass) with each variant, `--repeats` times (round the variants: A B A B ...), each
run in its own process:

  peers (benchmarks/peers.py says how each is configured): trl_plain (the hand-written TRL + peft
  script), trl_bfd_liger, trl_best / trl_best_nockpt (padding-free batches) and trl_best_bfd /
  trl_best_bfd_nockpt (BFD-packed rows) with ours' varlen attention kernel, fused AdamW, Liger,
  TRL's chunked LM head, with and without gradient checkpointing; unsloth (where installed)
  ours: summarizer.train.fit as the GPU presets run it: examples packed into rows of
        batch x max length tokens (ours_batch: the plain run's batches of 8, each packed;
        ours_ckpt: with gradient checkpointing and the loss through TRL's chunked LM head,
        for the memory they save; not run by default: ours_compile, with train.compile;
        ours_fused, the chunked head without checkpointing; ours_lean / ours_ckpt_lean,
        ours / ours_ckpt with train.lora_dropout_recompute; ours_eager: ours without
        the CUDA graph), each step's forward + backward replayed as one CUDA graph
        (summarizer/speed/graph_step.py), FlashAttention varlen kernel
        (summarizer/speed/packing.py), the LM head only at supervised positions, fused AdamW

and records non-padding tokens/s (steady and whole run: min / median / max over the repeats),
s/step, peak GPU memory, model FLOPs utilisation (peers.py has the formula), the fraction of a step
the GPU is busy (torch profiler over a few steps), and the held-out loss after one pass. Each
ours_* variant is compared with the peer of the same steps and checkpointing (peers.MATCHED).

Then it generates for the whole validation set (every dev prompt), every batched peer with the same
batch size (--gen-batch) and longest-first order, each `--repeats` times:
(1) per-example `generate` on the QLoRA model (a few rows: it is slow), (2) batched `generate` on
the QLoRA model, (3) `merged`: the adapter merged into a bf16 copy of the base, then `generate`,
(4) `merged_compiled`: the same with transformers' own fast path, `cache_implementation="static"`
and `compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead")` (generate compiles the
decode step; --no-compile: the static cache alone), (5) `ours`, the project's path: the same merged
copy, decoded by summarizer.speed.static_decode.greedy_static (static KV cache, one decode step
replayed as a CUDA graph): new tokens/s, summaries/s (the first repeat with merge, compile and graph
capture included), the share of prompts each peer wrote exactly ours' tokens for, and ROUGE-L against
ours' and against the reference completions.
Results: JSON under --out (and a markdown table printed, for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402  (benchmarks/peers.py)

ROWS = ROOT / "benchmarks" / "data" / "dialogsum_ko_dev_rows.json.gz"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Random-weight shapes (configs of the public models; no weights needed).
SHAPES = {
    "tiny": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    "llama-1b": dict(  # Llama-3.2-1B
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3b": dict(  # Llama-3.2-3B (the 3B shape of the low-memory preset)
        arch="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(  # Qwen3-4B
        arch="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "solar-10.7b": dict(  # SOLAR-10.7B: a 48-layer Llama
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
# The project's variants: what each changes in train=gpu_fast's settings.
OURS = {
    "ours": {},
    "ours_batch": {"pack_tokens": 0},  # the plain run's batches (8 examples a step), packed
    "ours_batch_eager": {"pack_tokens": 0, "cuda_graph": "false"},
    # the plain run's batches with checkpointing (and the chunked LM head): the memory-saving one
    "ours_batch_ckpt": {"pack_tokens": 0, "gradient_checkpointing": True},
    # checkpointing + the chunked LM head (fused_lm_head=auto), in the CUDA graph: the memory-bounded
    # path; smaller token budgets per row trade speed for memory
    "ours_ckpt": {"gradient_checkpointing": True},
    "ours_ckpt_6k": {"gradient_checkpointing": True, "pack_tokens": 6144},
    "ours_ckpt_4k": {"gradient_checkpointing": True, "pack_tokens": 4096},
    "ours_ckpt_eager": {"gradient_checkpointing": True, "cuda_graph": "false"},
    "ours_compile": {"compile": True},  # each decoder layer compiled; the warm-up steps pay it
    "ours_fused": {"fused_lm_head": "true"},  # TRL's chunked LM head without checkpointing
    # LoRA dropout masks drawn again in the backward instead of stored (summarizer/speed/lean_lora.py)
    "ours_lean": {"lora_dropout_recompute": True},
    "ours_ckpt_lean": {"gradient_checkpointing": True, "lora_dropout_recompute": True},
    # ours without the CUDA-graph step (train.cuda_graph=auto in gpu_fast; summarizer/speed/graph_step.py)
    "ours_eager": {"cuda_graph": "false"},
}
FIRST_ID = 16  # ids below this are special in the synthetic vocabulary (pad=0, eos=1, bos=2)


DEFAULT_VARIANTS = (
    "trl_plain,trl_best,trl_best_nockpt,trl_best_bfd,trl_best_bfd_nockpt,unsloth,"
    "ours_batch_ckpt,ours_batch,ours_ckpt,ours"
)


def main() -> None:
    ap = argparse.ArgumentParser(description="training + generation speed benchmark")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of the plain run (batches of --batch-size): the rows every variant trains "
        "once (default 200 on a GPU, 6 with --cpu-smoke)",
    )
    ap.add_argument("--train-rows", type=int, default=0, help="rows to train (0: steps x batch)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (min/median/max)")
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--gen-rows", type=int, default=0, help="prompts to generate for (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--single-rows", type=int, default=4, help="rows for per-example generate")
    ap.add_argument("--gen-batch", type=int, default=128, help="every batched peer's batch size")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=-1, help="cap on steps (default: one epoch)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument(
        "--no-compile", action="store_true", help="merged_compiled: the static cache, no compile"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s (MFU)"
    )
    ap.add_argument("--in-process", action="store_true", help="train every variant in this process")
    ap.add_argument("--quant", default=None, help="nf4 (default on GPU) | none (default on CPU)")
    ap.add_argument("--grad-ckpt", action="store_true", help="ours: gradient checkpointing on")
    ap.add_argument(
        "--lowmem", action="store_true", help="peak memory of experiment=low_memory_8gb"
    )
    ap.add_argument("--work", default="/tmp/bench", help="shapes and checkpoints go here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="allow running without a GPU")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if "unsloth" in variants and len(variants) == 1 and args.in_process:
        import_unsloth_first()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("error: bench.py measures a GPU; none is visible (use --cpu-smoke to try it here)")
    if args.repeats < 1:
        sys.exit(f"error: --repeats={args.repeats}: expected >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    args.quant = args.quant or ("nf4" if torch.cuda.is_available() else "none")
    args.steps = args.steps or (6 if args.cpu_smoke else 200)
    args.train_rows = args.train_rows or args.steps * args.batch_size
    path, tokenizer = make_shape(args.shape, work / "shapes")
    train_rows, eval_rows, all_rows = load_rows(args, tokenizer)
    flops = peers.flops_per_token(SHAPES[args.shape], train_rows)
    flops["peak_tflops"] = peers.peak_tflops(args.peak_tflops)
    result = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "env": environment(),
        "args": vars(args),
        "mfu": flops,
        "train": {},
        "generate": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.shape}{'-lowmem' if args.lowmem else ''}{'-cpu' if args.cpu_smoke else ''}"
    dest = out / f"{name}.json"
    if args.lowmem:
        result["lowmem"] = low_memory(path, tokenizer, train_rows, work)
        save(dest, result)
        print(json.dumps(result["lowmem"], indent=1))
        return
    # Repeats go round the variants (A B A B ...), not one variant's repeats in a row: the
    # machine's drift (clocks, heat, other tenants) then reaches every variant alike, and a time
    # limit leaves each variant with the repeats it got to.
    isolate = (len(variants) > 1 or args.repeats > 1) and not args.in_process
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats if isolate else 1):
        for variant in variants:
            print(f"== train {variant} (repeat {repeat + 1})", flush=True)
            if variant == "unsloth" and not peers.unsloth_available():
                if repeat:
                    continue
                figures = {"error": "not installed", "not_installed": True}
            elif isolate:
                runs[variant].append(isolated(variant, work, repeat))
                figures = peers.summarise(runs[variant])
            else:
                figures = train_guarded(variant, path, tokenizer, train_rows, eval_rows, args, work)
            if "error" not in figures:
                peers.add_mfu(figures, flops["flops_per_token"], flops["peak_tflops"])
            result["train"][variant] = figures
            save(dest, result)  # each run's figures survive a later crash or time limit
            top = figures.get("profile_top_host_ops")
            print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, (str, list))}))
            print(top or "", flush=True)
    ours_ok = "error" not in result["train"].get("ours", {"error": "not run"})
    if not args.no_generate and ours_ok:
        gen_rows = all_rows[: args.gen_rows or None]  # the whole validation set by default
        prompts = [r["prompt"] for r in gen_rows]
        refs = [r["completion"] for r in gen_rows]
        result["generate"] = generation(path, tokenizer, prompts, refs, args, work)
        save(dest, result)
    print(table(result))


def import_unsloth_first() -> None:
    """unsloth patches transformers, TRL and peft at import: it must come before them."""
    if peers.unsloth_available():
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # the held-out loss reads the logits
        import unsloth  # noqa: F401


def train_guarded(variant, path, tokenizer, train_rows, eval_rows, args, work) -> dict:
    try:
        figures, _ = train_variant(variant, path, tokenizer, train_rows, eval_rows, args, work)
    except peers.NotInstalled as e:
        return {"error": f"not installed: {e}", "not_installed": True}
    except Exception as e:  # one broken variant must not cost the others' figures
        import traceback

        traceback.print_exc()
        free()
        return {"error": f"{type(e).__name__}: {e}"}
    return figures


def isolated(variant: str, work: Path, repeat: int = 0) -> dict:
    """Train one variant once in its own process: Liger (the TRL peers, train.liger) patches
    transformers' model classes process-wide, and would otherwise reach every variant trained
    after it; unsloth patches transformers, TRL and peft at import."""
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--out", "--repeats"):
            skip = True
            continue
        if a.startswith(("--variants=", "--out=", "--repeats=")):
            continue
        argv.append(a)
    out = work / "variants" / variant / f"r{repeat}"
    shutil.rmtree(out, ignore_errors=True)  # no figures of an earlier run can stand in for these
    cmd = [sys.executable, __file__, *argv, "--variants", variant, "--out", str(out)]
    cmd += ["--repeats", "1", "--no-generate", "--in-process"]
    done = subprocess.run(cmd, cwd=ROOT)
    files = sorted(out.glob("*.json"))
    figures = json.loads(files[0].read_text())["train"].get(variant) if files else None
    if done.returncode != 0 or not figures:
        return {"error": f"the {variant} process exited with {done.returncode}"}
    return figures


# --- shapes and rows --------------------------------------------------------------------------


def make_shape(shape: str, folder: Path):
    """A random-weight model of `shape` saved as a local HF folder (bf16), with a word-level
    tokenizer whose token i is the text "i" (outputs decode to id strings, compared by ROUGE)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    path = folder / shape
    vocab = {str(i): i for i in range(spec["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="0", eos_token="1", bos_token="2", unk_token="3"
    )
    tokenizer.padding_side = "left"
    if (path / "config.json").is_file():
        return path, tokenizer
    config = AutoConfig.for_model(
        arch, pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=4096, **spec
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)  # a folder that exists is complete
    print(
        f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
        f"saved in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    del model
    free()
    return path, tokenizer


def load_rows(args, tokenizer):
    """Real Korean dev prompts + summaries (Gemma token ids) mapped into this vocabulary."""
    with gzip.open(ROWS, "rt", encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    span = len(tokenizer) - FIRST_ID

    def remap(ids):
        return [FIRST_ID + i % span for i in ids]

    rows = [
        {"prompt": remap(r["prompt"]), "completion": remap(r["completion"]) + [1]} for r in rows
    ]  # + eos, as training rows end
    rows = [r for r in rows if len(r["prompt"]) + len(r["completion"]) <= args.max_length]
    random.Random(0).shuffle(rows)
    n_eval = min(args.eval_rows, len(rows) // 4)
    train = rows[n_eval:][: args.train_rows]
    while len(train) < args.train_rows:  # the dev set has ~400 rows: repeat for longer runs
        train += rows[n_eval:][: args.train_rows - len(train)]
    return train, rows[:n_eval], rows


# --- training -----------------------------------------------------------------------------------


def train_variant(variant, path, tokenizer, train_rows, eval_rows, args, work: Path):
    import torch

    from summarizer.config import LoraConfig

    free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(tokenizer.pad_token_id, *((1, 0) if args.cpu_smoke else (3, 3)))
    out = work / "runs" / variant
    extra = {}
    if variant == "unsloth":  # loads the base itself
        start = time.perf_counter()
        trainer, base = peers.unsloth_trainer(
            path, tokenizer, train_rows, args, out, meter, bench_overrides(args)
        )
        trainer.train()
        lm = trainer.model
        extra.update(peers.unsloth_versions())
    else:
        base = load_base(path, args.quant)
        start = time.perf_counter()
    if variant in peers.TRL:
        trainer, attention = peers.trl_trainer(
            variant, base, tokenizer, train_rows, args, out, meter, bench_overrides(args)
        )
        trainer.train()
        lm = trainer.model
        peers.restore_attention(lm)
        extra["attention"] = attention
        extra["liger"] = bool(trainer.args.use_liger_kernel)
        extra["optim"] = getattr(trainer.args.optim, "value", str(trainer.args.optim))
        extra["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    elif variant == "unsloth":
        pass
    elif variant in OURS:
        from summarizer import model as summarizer_model
        from summarizer.train import fit as train

        lora = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=list(SEVEN))
        cfg = ours_train_config(args)
        for key, value in OURS[variant].items():
            setattr(cfg, key, value)
        if args.grad_ckpt:  # memory for speed (SOLAR-10.7B at 2048)
            cfg.gradient_checkpointing = True
        lm = summarizer_model.add_lora(base, lora, cfg.gradient_checkpointing, cfg.upcast_frozen)
        rows = [to_labels(r) for r in train_rows]
        train.fit(cfg, lm, tokenizer, rows, [], out, [meter])
        extra["gradient_checkpointing"] = bool(cfg.gradient_checkpointing)
    else:
        raise SystemExit(f"error: unknown variant {variant!r}")
    wall = time.perf_counter() - start
    figures = meter.figures()
    figures["wall_seconds_incl_setup"] = wall
    figures.update(extra)
    figures["eval_loss"] = held_out_loss(lm, eval_rows, tokenizer.pad_token_id)
    if torch.cuda.is_available():
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    adapter = out / "adapter"
    lm.save_pretrained(adapter)
    del lm, base
    free()
    return figures, adapter


def ours_train_config(args):
    """The GPU presets' training settings (conf/train/gpu_fast.yaml), read from the YAML itself."""
    from omegaconf import OmegaConf

    from summarizer.config import TrainConfig

    preset = OmegaConf.load(ROOT / "conf" / "train" / "gpu_fast.yaml")
    preset = {k: v for k, v in OmegaConf.to_container(preset).items() if k != "defaults"}
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), preset, bench_overrides(args))
    return OmegaConf.to_object(cfg)


def bench_overrides(args) -> dict:
    """What every variant shares: batch, length, lr schedule, one pass, no evaluation/saving."""
    return dict(
        batch_size=args.batch_size,
        max_length=args.max_length,
        grad_accum=1,
        lr=2e-4,
        scheduler="cosine",
        warmup_ratio=0.1,
        epochs=1,
        max_steps=args.max_steps,
        eval_strategy="no",
        save_steps=10**6,
        logging_steps=1,
        early_stopping_patience=0,
    )


def load_base(path: Path, quant: str):
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model

    cfg = ModelConfig(name=path.name, source="local", path=str(path), attn_implementation="sdpa")
    return build_model(cfg, QuantConfig(name=quant, method=quant), "/tmp/bench-cache")[0]


def to_labels(r: dict) -> dict:
    from summarizer.prompt import IGNORE_INDEX

    ids = r["prompt"] + r["completion"]
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(r["prompt"]) + r["completion"],
        "truncated": False,
    }


def held_out_loss(lm, rows, pad_id: int, batch: int = 8) -> float:
    """Mean completion loss on the held-out rows, computed the same way for every variant."""
    import torch

    from summarizer.train.loss import collate, completion_loss

    lm.eval()
    device = next(lm.parameters()).device
    total = count = 0.0
    with torch.no_grad(), autocast():
        for i in range(0, len(rows), batch):
            b = collate([to_labels(r) for r in rows[i : i + batch]], pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            n = int((b["labels"][:, 1:] != -100).sum())
            loss, _ = completion_loss(lm, b, n)
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


@contextlib.contextmanager
def autocast():
    import torch

    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CaptureCount(logging.Handler):
    """Counts the CUDA graphs captured: summarizer.speed.graph_step logs each one."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("train.cuda_graph: captured"):
            self.count += 1


class Meter(_trainer_callback_base()):
    """Counts real tokens per batch (wrapping the trainer's collator) and times optimizer steps
    after a warm-up; profiles a few steps for the GPU-busy fraction, from the middle of the run:
    the first steps after the warm-up still hold one-off costs (a CUDA graph's first launch
    uploads it: ~9 ms a launch, against ~55 ms of GPU work in a 1B step). A step in which a CUDA
    graph was captured (a new row width, seconds of eager warm-up) is timed apart: the tokens/s
    is the steady rate, and `tokens_per_second_incl_capture` the rate with the captures in."""

    def __init__(self, pad_id: int, warmup: int = 3, profile: int = 3):
        self.WARMUP, self.PROFILE = warmup, profile
        self.profile_at = warmup  # the first profiled step: the run's middle (on_train_begin)
        self.pad_id = pad_id
        self.tokens: list[int] = []
        self.step_times: list[float] = []
        self.captured: list[int] = []  # per step: the graphs captured in it
        self.losses: list[float] = []
        self.t0 = None
        self.prof = None
        self.busy = None
        self.profile_wall = None
        self.profile_top = None  # the profiler's table of host ops, by self CPU time
        self.captures = CaptureCount()
        self.captures_before = 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        # accelerate wraps the torch DataLoader: count what its collator hands to the model
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        inner = loader.collate_fn

        def counting(rows):
            batch = inner(rows)
            self.tokens.append(real_tokens(batch, self.pad_id))
            return batch

        loader.collate_fn = counting
        self.profile_at = max(self.WARMUP, (state.max_steps - self.PROFILE) // 2)
        logger = logging.getLogger("summarizer.speed.graph_step")
        logger.setLevel(logging.INFO)
        logger.addHandler(self.captures)

    def on_train_end(self, args, state, control, **kw):
        logging.getLogger("summarizer.speed.graph_step").removeHandler(self.captures)

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self.captures_before = self.captures.count
        self.t0 = time.perf_counter()
        if state.global_step == self.profile_at and self.prof is None and has_cuda():
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.profile_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        self.step_times.append(time.perf_counter() - self.t0)
        self.captured.append(self.captures.count - self.captures_before)
        if (
            self.prof is not None
            and self.busy is None
            and (state.global_step >= self.profile_at + self.PROFILE)
        ):
            wall = time.perf_counter() - self.profile_start
            self.prof.__exit__(None, None, None)
            self.busy = gpu_busy_seconds(self.prof) / wall
            self.profile_wall = wall
            # where the host time goes (the GPU idles while it is spent): for RESULTS.md's notes
            self.profile_top = self.prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60
            )

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def figures(self) -> dict:
        steps = len(self.step_times)
        # the profiled steps run slower (the profiler's own overhead): leave them out of speed
        profiled = range(self.profile_at, self.profile_at + self.PROFILE)
        profiled = profiled if self.busy is not None else ()
        timed = [i for i in range(self.WARMUP, steps) if i not in profiled]
        steady = [i for i in timed if not self.captured[i]]

        def rate(indices):
            seconds = sum(self.step_times[i] for i in indices)
            tokens = sum(self.tokens[i] for i in indices)
            n = max(len(indices), 1)
            return tokens / seconds if seconds else float("nan"), seconds / n, tokens / n

        per_second, per_step, tokens_per_step = rate(steady)
        return {
            "steps": steps,
            "tokens_total": sum(self.tokens[:steps]),
            "tokens_per_second_whole_run": rate(range(steps))[0],
            "tokens_per_step": tokens_per_step,
            "seconds_per_step": per_step,
            "tokens_per_second": per_second,
            "tokens_per_second_incl_capture": rate(timed)[0],  # the timed steps, captures in
            "graph_captures": self.captures.count,
            "graph_captures_timed": sum(self.captured[i] for i in timed),
            "gpu_busy": self.busy,
            "profile_top_host_ops": self.profile_top,
            "train_loss_last5": sum(self.losses[-5:]) / max(len(self.losses[-5:]), 1),
            "step_seconds": [round(t, 5) for t in self.step_times],
            "step_tokens": self.tokens[:steps],
            "step_captured": [i for i in range(steps) if self.captured[i]],
        }


def real_tokens(batch: dict, pad_id: int) -> int:
    if "num_tokens" in batch:  # our packed rows
        return int(batch["num_tokens"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_id).sum())  # padding-free rows (TRL)


def gpu_busy_seconds(prof) -> float:
    """Kernel and copy time on the GPU within the profiled steps (one stream: they do not overlap)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / 1e6


# --- generation ---------------------------------------------------------------------------------


GEN_PEERS = ("per_example", "plain_batched", "merged", "merged_compiled", "ours")


def generation(path, tokenizer, prompts, refs, args, work: Path) -> dict:
    """Every peer generates for the same prompts, greedy, `args.repeats` times: the first run pays
    the one-off costs (merge, compile, graph captures: `new_tokens_per_second` is that run's, the
    merge counted), the min / median / max are over every run (the merge left out)."""
    import torch

    from summarizer import generate
    from summarizer.config import GenerateConfig
    from summarizer.speed import merge as merging

    adapter = work / "runs" / "ours" / "adapter"
    eos = [tokenizer.eos_token_id]
    res = {}
    outputs = {}
    qlora = load_adapter_model(path, adapter, args.quant)
    n_single = min(args.single_rows, len(prompts))  # ~0.1 s a token on the GPU: a few do
    repeats = args.repeats
    new = args.max_new_tokens

    def one_by_one():
        return hf_generate(qlora, prompts[:n_single], tokenizer, new, batch=1)

    res["per_example"], _ = repeated(one_by_one, n_single, repeats)
    batched = lambda: hf_generate(qlora, prompts, tokenizer, new, args.gen_batch)  # noqa: E731
    res["plain_batched"], outputs["plain_batched"] = repeated(batched, len(prompts), repeats)
    # As the pipeline does after training: the QLoRA model in memory made dense (the adapter merged
    # into a bf16 copy of the base), timed once and counted in the first run of each merged peer.
    merge = timed(lambda: merging.merged_for_generation(qlora))
    lm, qlora = merge["value"], None
    free()
    res["merge_seconds"] = merge["seconds"]

    def ours():
        cfg = GenerateConfig(
            batch_size=args.gen_batch,
            max_new_tokens=new,
            stop_at_newline=False,
            merge="true",
            static_decode="true",
        )
        texts = generate.summaries(cfg, lm, tokenizer, prompts, eos)
        return [[int(x) for x in s.split()] for s in texts]

    compiled = not args.no_compile
    peers_merged = {
        "ours": ours,  # first: any first-use cost of the bf16 kernels is on the project's side
        "merged": lambda: hf_generate(lm, prompts, tokenizer, new, args.gen_batch),
        # transformers' own best: static cache, the decode step compiled by generate itself
        "merged_compiled": lambda: hf_generate(
            lm, prompts, tokenizer, new, args.gen_batch, static=True, compiled=compiled
        ),
    }
    for name, fn in peers_merged.items():
        res[name], outputs[name] = repeated(fn, len(prompts), repeats, merge["seconds"])
    res["merged_compiled"]["compiled"] = compiled
    mine = outputs["ours"]
    for name, out in outputs.items():
        res[name]["rougeL_vs_reference"] = rouge_l(out, refs)
        res[name]["rougeL_vs_plain_batched"] = rouge_l(out, outputs["plain_batched"])
        if name != "ours":  # ours against itself is 100 by construction
            same = sum(a == b for a, b in zip(out, mine))
            res[name]["identical_to_ours"] = same
            res[name]["identical_to_ours_share"] = same / max(len(mine), 1)
            res[name]["rougeL_vs_ours"] = rouge_l(out, mine)
    # the static decoder must write what `generate` writes on the same weights (100 = identical)
    res["ours"]["rougeL_vs_merged"] = res["merged"]["rougeL_vs_ours"]
    res["ours"]["identical_to_merged"] = res["merged"]["identical_to_ours"]
    base = res["plain_batched"]["new_tokens_per_second"]
    for k in ("plain_batched", "merged", "merged_compiled", "ours"):
        res[k]["speedup_vs_plain_batched"] = res[k]["new_tokens_per_second"] / base
    for k in ("merged", "merged_compiled"):
        res["ours"][f"speedup_vs_{k}"] = (
            res["ours"]["new_tokens_per_second"] / res[k]["new_tokens_per_second"]
        )
    res["batch_size"] = args.gen_batch
    if torch.cuda.is_available():
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def repeated(fn, n: int, repeats: int, one_off: float = 0.0) -> tuple[dict, list]:
    """Run `fn` `repeats` times: the first run's figures with `one_off` seconds added (what a single
    evaluation costs), and each run's new tokens/s, min / median / max."""
    runs = [timed(fn) for _ in range(repeats)]
    first = dict(runs[0])
    first["seconds"] += one_off
    figures = speed(first, n)
    rates = [sum(len(v) for v in r["value"]) / r["seconds"] for r in runs]
    figures["run_seconds"] = [r["seconds"] for r in runs]
    figures["new_tokens_per_second_min"] = min(rates)
    figures["new_tokens_per_second_median"] = statistics.median(rates)
    figures["new_tokens_per_second_max"] = max(rates)
    figures["repeats_identical"] = all(r["value"] == runs[0]["value"] for r in runs)
    return figures, runs[0]["value"]


def load_adapter_model(path, adapter, quant: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(path, quant), str(adapter)).eval()


def hf_generate(lm, prompts, tokenizer, max_new, batch=1, static=False, compiled=False):
    """A peer: `generate` as is, greedy, on left-padded batches of `batch` prompts taken longest
    first (the order the project's path uses), outputs in the input order. static: a static KV
    cache, with `compiled` the decode step compiled by generate (transformers' CompileConfig, the
    documented fast path: fullgraph, reduce-overhead = CUDA graphs); without, compile is off."""
    import torch
    from transformers import CompileConfig

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs: list = [None] * len(prompts)
    device = next(lm.parameters()).device
    special = set(tokenizer.all_special_ids)
    kwargs = {}
    if static:
        kwargs["cache_implementation"] = "static"
        if compiled:
            config = CompileConfig(fullgraph=True, mode="reduce-overhead")
            if device.type == "cpu":  # generate compiles on accelerators only unless told
                config._compile_all_devices = True
            kwargs["compile_config"] = config
        else:
            kwargs["disable_compile"] = True
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        chunk = [prompts[j] for j in idx]
        enc = tokenizer.pad({"input_ids": chunk}, return_tensors="pt", padding_side="left")
        with torch.inference_mode():
            g = lm.generate(
                **{k: v.to(device) for k, v in enc.items()},
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
        for j, row in zip(idx, g[:, enc["input_ids"].shape[1] :].tolist()):
            outs[j] = strip_after_eos(row, tokenizer.eos_token_id, special)
    return outs


def strip_after_eos(row, eos, special=()):
    """The new tokens up to the first eos, special tokens dropped: what the project's path keeps
    (it decodes with skip_special_tokens), so outputs compare token for token."""
    out = []
    for t in row:
        if t == eos:
            break
        if t not in special:
            out.append(t)
    return out


def timed(fn) -> dict:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return {"seconds": time.perf_counter() - start, "value": value}


def speed(t: dict, n: int) -> dict:
    new = sum(len(v) for v in t["value"])
    return {
        "rows": n,
        "seconds": t["seconds"],
        "new_tokens": new,
        "new_tokens_per_second": new / t["seconds"],
        "summaries_per_second": n / t["seconds"],
    }


class _Ids:
    """rouge_score tokenizer for token-id sequences: each id is one token."""

    def tokenize(self, ids):
        return [str(i) for i in ids]


def rouge_l(preds, refs) -> float:
    """Mean ROUGE-L F1 (x100) of token-id sequences, by rouge_score (two empty sequences: 100)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Ids())
    scores = [
        100.0 * (p == r) if not p or not r else 100 * scorer.score(r, p)["rougeL"].fmeasure
        for p, r in zip(preds, refs)
    ]
    return sum(scores) / max(len(scores), 1)


# --- low-memory preset ---------------------------------------------------------------------------


def low_memory(path, tokenizer, train_rows, work: Path) -> dict:
    """Peak GPU memory of experiment=low_memory_8gb's training and generation on this shape."""
    import torch
    from omegaconf import OmegaConf

    from summarizer import generate, model
    from summarizer.config import GenerateConfig, LoraConfig, QuantConfig, TrainConfig
    from summarizer.speed import merge, switches
    from summarizer.train import fit as train

    preset = OmegaConf.load(ROOT / "conf" / "experiment" / "low_memory_8gb.yaml")
    tcfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        preset.train,
        {
            "max_steps": 3,
            "eval_strategy": "no",
            "save_steps": 10**6,
            "logging_steps": 1,
            "early_stopping_patience": 0,
        },
    )
    tcfg = OmegaConf.to_object(tcfg)
    lcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoraConfig), preset.lora))
    gcfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(GenerateConfig),
            preset.generate,
            {"stop_at_newline": False, "max_new_tokens": 64},
        )
    )
    free()
    has = torch.cuda.is_available()
    if has:
        torch.cuda.reset_peak_memory_stats()
    base = load_base(path, "nf4")
    loaded = torch.cuda.max_memory_allocated() / 2**30 if has else None
    lm = model.add_lora(base, lcfg, tcfg.gradient_checkpointing)
    # the longest rows, cut to the preset's max length: the worst case of a step
    rows = sorted(train_rows, key=lambda r: -(len(r["prompt"]) + len(r["completion"])))
    rows = [to_labels(r) for r in rows[: tcfg.batch_size * tcfg.grad_accum * 3]]
    for r in rows:
        for k in ("input_ids", "labels"):
            r[k] = r[k][-tcfg.max_length :]
    start = time.perf_counter()
    figures = train.fit(tcfg, lm, tokenizer, rows, [], work / "runs" / "lowmem")
    seconds = time.perf_counter() - start
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if has else None
    reserved_train = torch.cuda.max_memory_reserved() / 2**30 if has else None
    if has:
        torch.cuda.reset_peak_memory_stats()
    prompts = [r["input_ids"][: tcfg.max_length - 64] for r in rows[:16]]
    use_merged = switches.use_merged(gcfg, QuantConfig(name="nf4", method="nf4"))
    if use_merged:  # as the pipeline would: generate with the dense merged copy
        lm = merge.merged_for_generation(lm)
        free()
    generate.summaries(gcfg, lm, tokenizer, prompts, [tokenizer.eos_token_id])
    peak_gen = torch.cuda.max_memory_allocated() / 2**30 if has else None
    return {
        "settings": {
            "train": OmegaConf.to_container(preset.train),
            "lora": OmegaConf.to_container(preset.lora),
            "generate": OmegaConf.to_container(preset.generate),
            "generate_merged": use_merged,
        },
        "peak_gib_after_load": loaded,
        "peak_gib_train": peak_train,
        "reserved_gib_train": reserved_train,
        "peak_gib_generate": peak_gen,
        "train_seconds_3_steps": seconds,
        "train_figures": figures,
    }


# --- helpers -------------------------------------------------------------------------------------


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    if has_cuda():
        import torch

        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if has_cuda():
        import torch

        torch.cuda.empty_cache()


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    for pkg in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def save(dest: Path, result: dict) -> None:
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(dest)


def table(r: dict) -> str:
    """Markdown for RESULTS.md: the matched whole-run ratios first, then every variant, then
    generation."""
    env = r["env"]
    lines = [
        f"### {r['shape']} ({env['device']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, trl {env['trl']})",
        "",
    ]
    t = {k: v for k, v in r["train"].items() if "error" not in v}
    lines += headline(t)
    lines += [
        "",
        "| training | tokens/s, median (min-max) | whole run | s/step | tokens/step | peak GiB "
        "| MFU (whole run) | GPU busy | held-out loss | ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r["train"].items():
        if "error" in v:
            why = "not installed" if v.get("not_installed") else f"failed: {v['error'][:80]}"
            lines.append(f"| {k} | {why} |")
            continue
        lines.append(
            f"| {k} | {spread(v, 'tokens_per_second')} | {spread(v, 'tokens_per_second_whole_run')} "
            f"| {v['seconds_per_step']:.3f} | {v['tokens_per_step']:,.0f} | {fmt(v.get('peak_gib'))} "
            f"| {pct(v.get('mfu'))} ({pct(v.get('mfu_whole_run'))}) | {fmt(v.get('gpu_busy'))} "
            f"| {v['eval_loss']:.4f} | {'yes' if v.get('gradient_checkpointing') else 'no'} |"
        )
    m = r.get("mfu") or {}
    if m:
        lines.append(
            f"\nMFU: {m['flops_per_token'] / 1e9:.3g} GFLOPs a token ({m['formula']}) over "
            f"{fmt(m.get('peak_tflops'))} TFLOP/s peak; {r['args'].get('repeats', 1)} repeats "
            f"of {r['args'].get('train_rows')} rows each."
        )
    g = r.get("generate") or {}
    if g:
        lines += [
            "",
            f"| generation (batch {g.get('batch_size', '-')}) | new tokens/s, first run "
            "| runs: median (min-max) | summaries/s | x plain batched | identical to ours "
            "| ROUGE-L vs ours | ROUGE-L vs reference |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in GEN_PEERS:
            if k not in g:
                continue
            v = g[k]
            same = v.get("identical_to_ours_share")
            lines.append(
                f"| {k} | {v['new_tokens_per_second']:,.0f} | {gen_spread(v)} "
                f"| {v['summaries_per_second']:.2f} | {fmt(v.get('speedup_vs_plain_batched'))} "
                f"| {'-' if same is None else pct(same)} | {fmt(v.get('rougeL_vs_ours'))} "
                f"| {fmt(v.get('rougeL_vs_reference'))} |"
            )
        if "ours" in g:
            lines.append(
                f"\nMerge {g['merge_seconds']:.1f} s (in each merged peer's first run); ours wrote "
                f"the same tokens as merged `generate` for {g['ours']['identical_to_merged']} of "
                f"{g['ours']['rows']} prompts (ROUGE-L {g['ours']['rougeL_vs_merged']:.2f})."
            )
    return "\n".join(lines)


def headline(t: dict) -> list[str]:
    """ours / peer, whole run (every step in, median of the repeats): each ours variant against
    the peer of the same steps and checkpointing, the strongest TRL configuration and unsloth."""
    trl = {k: v for k, v in t.items() if k in peers.TRL and _whole_rate(v)}
    strongest = max(trl, key=lambda k: _whole_rate(trl[k])) if trl else None
    rows = []
    for ours, matched in peers.MATCHED.items():
        if ours not in t:
            continue
        against = [matched, strongest, peers.UNSLOTH_MATCHED.get(ours)]
        seen = set()
        for peer in against:
            if peer is None or peer in seen or peer not in t:
                continue
            seen.add(peer)
            label = peer + (" (matched)" if peer == matched else "")
            label += " (strongest TRL)" if peer == strongest else ""
            rows.append(ratio_row(ours, label, t[ours], t[peer]))
    if not rows:
        return []
    return [
        "| ours | / peer | whole-run tokens/s | steady tokens/s | peak memory | held-out loss |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def ratio_row(name: str, label: str, v: dict, p: dict) -> str:
    whole = _whole_rate(v) / _whole_rate(p) if _whole_rate(p) else None
    steady = v["tokens_per_second"] / p["tokens_per_second"] if p["tokens_per_second"] else None
    mem = v["peak_gib"] / p["peak_gib"] if v.get("peak_gib") and p.get("peak_gib") else None
    loss = 100 * (v["eval_loss"] - p["eval_loss"]) / p["eval_loss"]
    return (
        f"| {name} | {label} | **{times(whole)}** | {times(steady)} | {times(mem)} "
        f"| {loss:+.2f} % |"
    )


def times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def spread(v: dict, key: str) -> str:
    if key not in v:
        return "-"
    if key + "_min" in v and v.get("repeats", 1) > 1:
        return f"{v[key]:,.0f} ({v[key + '_min']:,.0f}-{v[key + '_max']:,.0f})"
    return f"{v[key]:,.0f}"


def gen_spread(v: dict) -> str:
    if "new_tokens_per_second_median" not in v:
        return "-"
    return (
        f"{v['new_tokens_per_second_median']:,.0f} ({v['new_tokens_per_second_min']:,.0f}-"
        f"{v['new_tokens_per_second_max']:,.0f})"
    )


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def whole_run(v: dict, plain: dict | None) -> str:
    """Tokens/s over every step: the warm-up, graph captures and profiled steps in (a short run's
    rate as its user sees it; one-off costs weigh less the longer the run)."""
    rate, base = _whole_rate(v), _whole_rate(plain or {})
    if rate is None:
        return "-"
    return f"{rate:,.0f}, {fmt(rate / base if base else None)}x"


def _whole_rate(v: dict) -> float | None:
    if "tokens_per_second_whole_run" in v:
        return v["tokens_per_second_whole_run"]
    if v.get("step_seconds"):  # results saved before that key: the same from the step lists
        return sum(v["step_tokens"]) / sum(v["step_seconds"])
    return None


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
