"""Fine-tune the LoRA model with TRL's SFTTrainer on pre-tokenized, completion-only examples."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import re
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from summarizer import distributed, graph_step, lean_lora, packing
from summarizer.config import TrainConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.prompt import IGNORE_INDEX

log = logging.getLogger(__name__)

LOSS_STATE = "summarizer_state.json"  # in each checkpoint: the train-loss sum so far (exact resume)
MANIFEST = "checksums.json"  # in each checkpoint: size + sha256 of every file, written last


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Left-pad a batch; position ids count real tokens only, as `generate` does for left padding."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, width - n :] = torch.tensor(r["input_ids"])
        labels[i, width - n :] = torch.tensor(r["labels"])
        mask[i, width - n :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def completion_loss(
    model, batch: dict, num_items: int | torch.Tensor | None = None, fused: bool = False
):
    """Cross-entropy over supervised tokens, running the LM head only over the completion tail.

    With left padding every supervised token sits in the last few positions, so asking the model for
    `logits_to_keep` = (longest completion + 1) skips the vocabulary projection for the prompt. On a
    262k-vocabulary model on CPU that projection is most of the step (FACTS: 3x faster). Returns
    (sum of token losses / num_items, model outputs); num_items defaults to this batch's token count.
    fused: the same loss through the chunked LM head TRL's SFTTrainer puts on the model
    (`add_fused_lm_head`): log-probabilities in vocabulary tiles, recomputed in the backward, so no
    (tokens x vocabulary) logits, their fp32 copy or their gradient are ever held.
    """
    if graph_step.POSITIONS in batch:  # a static row (train.cuda_graph): fixed loss positions
        return graph_step.static_loss(model, batch, num_items, chunked=fused)
    # skip_logits: the Trainer's evaluation adds it when Liger is on; this loss needs the logits
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens", "skip_logits")}
    labels = batch["labels"]
    if fused:  # on CUDA only labelled positions are projected; elsewhere every position is
        outputs = model(
            **inputs,
            labels=labels,
            num_items_in_batch=num_items,
            use_cache=False,
            fused_lm_head=True,
        )
        return outputs.loss, outputs
    if "cu_seq_lens_q" in batch:  # a packed row: completions are spread along it
        return _packed_loss(model, inputs, labels, num_items)
    supervised = labels != IGNORE_INDEX
    first = int(torch.where(supervised.any(1), supervised.float().argmax(1), labels.shape[1]).min())
    keep = max(1, labels.shape[1] - first + 1)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    logits = outputs.logits[:, :-1, :].float()
    targets = labels[:, labels.shape[1] - keep + 1 :]
    return _mean_loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), num_items), outputs


def _packed_loss(model, inputs: dict, labels: torch.Tensor, num_items):
    """Loss of a packed (1, L) row: the LM head runs only at positions whose next token is
    supervised (`logits_to_keep` as an index tensor), so no (L x vocabulary) logits are made."""
    where = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    if where.numel() == 0:  # nothing supervised (a bin of fully truncated rows): zero, with grads
        where = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**inputs, use_cache=False, logits_to_keep=where)
    targets = labels[0, where + 1]
    return _mean_loss(outputs.logits[0].float(), targets, num_items), outputs


def _mean_loss(logits: torch.Tensor, targets: torch.Tensor, num_items) -> torch.Tensor:
    """Summed cross-entropy of (N, vocab) logits over supervised targets / num_items (default:
    this batch's supervised count; the trainer passes the count across accumulated batches)."""
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum() if num_items is None else num_items
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


class CompletionOnlyTrainer(SFTTrainer):
    """SFTTrainer with `completion_loss` (TRL's CPU loss path projects every position), and
    checkpoints that carry what an exact resume needs beyond HF's own files."""

    tokens_seen = 0  # non-padding training tokens, for tokens/s
    fused_lm_head = False  # the loss through TRL's chunked LM head (train.fused_lm_head)
    loss_before = 0.0  # train-loss sum of the steps before the checkpoint this call resumed from
    graph_step: graph_step.GraphStep | None = None  # train.cuda_graph: forward + backward replayed
    graph_required = False  # train.cuda_graph=true: a step that cannot be captured is an error

    def _save_checkpoint(self, model, trial):
        folder = Path(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            # HF keeps the loss sum in memory only: a resumed run would average its own steps alone.
            total = self.loss_before + getattr(self, "_total_loss_scalar", 0.0)
            total += float(getattr(self, "_tr_loss", 0.0))  # steps since the last log
            state = {"train_loss_sum": total, "global_step": self.state.global_step}
            write_atomic(folder / LOSS_STATE, json.dumps(state))
        super()._save_checkpoint(model, trial)  # ends with trainer_state.json
        self.accelerator.wait_for_everyone()  # DDP: every rank's rng_state_N.pth is in, then hash
        if self.args.should_save:
            write_manifest(folder)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """HF's step (forward, backward), or its CUDA-graph replay; the Trainer still clips the
        gradients, steps the optimizer and the LR schedule, and zeroes the gradients."""
        if self.graph_step is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        count = num_items_in_batch
        if count is None:  # per-row mean, averaged over the accumulated rows
            targets = inputs[graph_step.TARGETS] != IGNORE_INDEX
            count = targets.sum() * self.current_gradient_accumulation_steps
        try:
            with self.compute_loss_context_manager():
                loss = self.graph_step(model, inputs, count)
        except graph_step.CaptureError as err:
            if self.graph_required:
                raise UserError(f"train.cuda_graph=true: {err}; use auto or false") from err
            log.warning("train.cuda_graph=auto: %s; training eagerly", err)
            self.graph_step = None
            return super().training_step(model, inputs, num_items_in_batch)
        self.tokens_seen += int(inputs["num_tokens"])
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = completion_loss(model, inputs, num_items_in_batch, self.fused_lm_head)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
        if model.training:
            real = inputs.get("num_tokens")  # packed rows: tokens before the fill
            self.tokens_seen += int(real if real is not None else inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss


class StopOnNonFinite(TrainerCallback):
    """A NaN/inf loss never recovers: stop at once with a clear error instead of hours later."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise UserError(
                    f"{key} became {value} at step {state.global_step}; lower train.lr or check the data"
                )


def write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """Why training cannot resume from `folder` (a file missing, truncated or altered), else None.
    Our checkpoints are checked against their manifest; others (or one cut off before its manifest)
    by structure: JSON parses, safetensors sizes match their header, torch files pass their CRCs."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (its saving was cut off)"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, meta in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{name} has {path.stat().st_size} bytes, {meta['size']} were saved"
            if _sha256(path) != meta["sha256"]:
                return f"{name} differs from the saved file (checksum)"
        return None
    try:
        int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "trainer_state.json is not a valid trainer state"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    weights = [
        p for p in folder.iterdir() if re.match(r"(adapter_)?model.*\.(safetensors|bin)$", p.name)
    ]
    if not weights:
        return "no model or adapter weights"
    for path in sorted(folder.iterdir()):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            return "is truncated"
        try:
            header = json.loads(f.read(n))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return "has a garbled header"
    if 8 + n + end != size:
        return f"has {size} bytes, its header says {8 + n + end}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with CRC-32s: truncation or altered bytes show."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "is truncated or not a torch file"
    return f"is altered (bad CRC in {bad})" if bad else None


def verify_checkpoint(path: str | Path, key: str) -> None:
    """A one-line error naming the checkpoint when it cannot be resumed from."""
    problem = checkpoint_problem(Path(path))
    if problem:
        raise UserError(f"{key}: checkpoint {path} is corrupt: {problem}; use an earlier one")


def last_good_checkpoint(folder: Path) -> Path:
    """For train.resume: the newest checkpoint-N under `folder`. One whose saving was cut off (a kill
    mid-save: no trainer_state.json) is passed over for the one before; a damaged one is an error."""
    found = sorted(
        (p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for i, ckpt in enumerate(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if not (ckpt / "trainer_state.json").is_file():
            log.warning("%s: %s; resuming from an earlier checkpoint", ckpt, problem)
            continue
        earlier = f"delete it to resume from {found[i + 1].name}" if i + 1 < len(found) else ""
        raise UserError(
            f"train.resume=true: checkpoint {ckpt} is corrupt: {problem}; "
            f"{earlier or 'no earlier checkpoint: start a new run (without train.resume)'}"
        )
    raise UserError(
        f"train.resume=true: no complete checkpoint-N in {folder} (the run stopped before its first "
        "save, see train.save_steps): start it again as a new run (without train.resume)"
    )


def resolve_checkpoint(path: str) -> str:
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return str(p)
    last = get_last_checkpoint(str(p)) if p.is_dir() else None
    if not last:
        raise UserError(
            f"train.resume_from={path}: no checkpoint-N folder with trainer_state.json there"
        )
    return last


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


def training_args(cfg: TrainConfig, output_dir: Path) -> SFTConfig:
    on_gpu = torch.cuda.is_available()
    if cfg.lr <= 0:
        raise UserError(f"train.lr={cfg.lr} must be > 0")
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        raise UserError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.eval_strategy not in ("steps", "epoch", "no"):
        raise UserError(f"train.eval_strategy={cfg.eval_strategy!r}: expected steps, epoch or no")
    precision = cfg.precision
    if precision == "auto":
        precision = (
            "bf16" if on_gpu and torch.cuda.is_bf16_supported() else ("fp16" if on_gpu else "fp32")
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision={cfg.precision!r}: expected auto, fp32, bf16 or fp16")
    bins = _packs_bins(cfg)
    if cfg.pack_tokens is not None and cfg.pack_tokens < 0:
        raise UserError(f"train.pack_tokens={cfg.pack_tokens}: expected null, 0 or a token count")
    if cfg.pack_multiple < 1:
        raise UserError(f"train.pack_multiple={cfg.pack_multiple}: expected a token count >= 1")
    optim = cfg.optim if cfg.optim != "auto" else ("paged_adamw_32bit" if on_gpu else "adamw_torch")
    evaluate = cfg.eval_strategy != "no"
    early_stop = evaluate and cfg.early_stopping_patience > 0
    if early_stop and cfg.eval_strategy == "steps" and cfg.save_steps % cfg.eval_steps:
        raise UserError(
            f"train.save_steps={cfg.save_steps} must be a multiple of train.eval_steps={cfg.eval_steps} "
            "for early stopping to keep the best checkpoint"
        )
    liger = use_liger(cfg)
    args = SFTConfig(
        output_dir=str(output_dir),
        # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the model by the Trainer,
        # as TRL's use_liger_kernel does; our loss asks for logits at supervised positions only
        use_liger_kernel=liger,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        # Packed: one item is a bin of examples already (train.pack_tokens).
        per_device_train_batch_size=1 if bins else cfg.batch_size,
        per_device_eval_batch_size=1 if bins else cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        eval_strategy=cfg.eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy=cfg.eval_strategy if early_stop else "steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        greater_is_better=False if early_stop else None,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",  # MLflow is logged by our own callback into the pipeline's run
        max_length=cfg.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenized (prompt.encode)
        prediction_loss_only=True,
        dataloader_num_workers=cfg.dataloader_workers,
        use_cpu=not on_gpu,
        # DDP: every LoRA weight gets a gradient each step; HF would otherwise search a PeftModel
        # for unused parameters on every backward (it only skips that for a PreTrainedModel).
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # HF would log a NaN loss as the running mean: hide nothing
    )
    if args.n_gpu > 1:
        # One process on a host with several GPUs: the model sits on one GPU, and HF would wrap it
        # in nn.DataParallel (TRL refuses; trainer=ddp is the way to use them all). HF's Trainer
        # sets the same for a model spread over GPUs.
        args._n_gpu = 1
    return args


def fit(
    cfg: TrainConfig,
    model,
    tokenizer,
    train_rows: list[dict],
    eval_rows: list[dict],
    output_dir: Path,
    callbacks: list | None = None,
    resume_from: str | Path | None = None,
) -> dict:
    """Train in place; returns loss and throughput figures. Checkpoints go to output_dir/checkpoints.
    `resume_from` (train.resume's checkpoint) wins over `cfg.resume_from`."""

    args = training_args(cfg, output_dir / "checkpoints")
    graphed = use_cuda_graph(cfg)
    binned, shapes = _packs_bins(cfg), []
    if binned:
        # One dataset item = one bin of examples packed into a row (batch size 1 bin per device).
        budget = cfg.pack_tokens or cfg.batch_size * cfg.max_length
        train_bins, eval_bins = _bins(train_rows, budget), _bins(eval_rows, budget)
        train_ds = _packed_dataset(train_bins)
        eval_ds = _packed_dataset(eval_bins) if eval_rows else None
        log.info(
            "packing: %d training rows into %d rows of <= %d tokens",
            len(train_rows),
            len(train_ds),
            budget,
        )
        if graphed:  # every row in one static shape, as the graph replays it
            bins = train_bins + eval_bins
            shapes = [graph_step.plan(bins, budget, cfg.max_length, cfg.pack_multiple)]
    else:
        train_ds = _dataset(train_rows)
        eval_ds = _dataset(eval_rows) if eval_rows else None
        if graphed:  # a few static shapes any batch fits (the sampler's batches are not known)
            most = max(cfg.batch_size, cfg.eval_batch_size if eval_rows else 0)
            rows = train_rows + eval_rows
            shapes = graph_step.plan_batches(rows, most, cfg.max_length, cfg.pack_multiple)
    if shapes:
        log.info("train.cuda_graph: rows of %s", ", ".join(map(str, shapes)))

    def collator(items):
        rows = [r for item in items for r in _unbin(item)] if binned else items
        if shapes:
            shape = graph_step.pick(shapes, rows)
            return graph_step.collate_static(rows, tokenizer.pad_token_id, shape)
        if cfg.packing:  # bins, or (pack_tokens=0) the padded path's batches, each into one row
            return packing.collate_packed(rows, tokenizer.pad_token_id, cfg.pack_multiple)
        return collate(rows, tokenizer.pad_token_id)

    if args.eval_strategy != "no" and eval_ds is None:
        raise UserError("train.eval_strategy needs validation rows (data.val_size > 0)")
    extra = list(callbacks or []) + [StopOnNonFinite()]
    if args.load_best_model_at_end:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = CompletionOnlyTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=extra,
    )
    trainer.fused_lm_head = use_fused_head(cfg)
    trainer.graph_step = graph_step.GraphStep(chunked=trainer.fused_lm_head) if graphed else None
    trainer.graph_required = str(cfg.cuda_graph).lower() == "true"
    resume = str(resume_from) if resume_from else None  # checked by last_good_checkpoint
    if not resume and cfg.resume_from:
        resume = resolve_checkpoint(cfg.resume_from)
        verify_checkpoint(resume, "train.resume_from")
    start_step, loss_sum = 0, None
    if resume:
        start_step, loss_sum = _resume_state(Path(resume))
        trainer.loss_before = loss_sum or 0.0
        log.info("resuming from %s (step %d)", resume, start_step)
    start = time.perf_counter()
    # while the Trainer runs (its evaluations included); each is undone on the way out
    with (
        packing.attention(model, cfg.packing),
        lean_lora.dropout_recompute(model, cfg.lora_dropout_recompute),
        compiled_layers(model, cfg.compile),
    ):
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
        eval_loss = _final_eval_loss(trainer, eval_ds) if eval_ds is not None else None
    captures = []  # each graph's warm-up + capture: seconds inside train_seconds
    if trainer.graph_step is not None:
        captures = trainer.graph_step.capture_seconds
        trainer.graph_step.close()
    # Mixed precision: accelerate wrapped model.forward in autocast; unwrap it so generation runs
    # in the model's own dtype, as `predict` later does (a static KV cache also needs one dtype).
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    loss_avg = float(result.training_loss)  # HF's: over the steps of this call only
    if loss_sum is not None and result.global_step:
        ran = result.global_step - start_step
        loss_avg = (loss_sum + loss_avg * ran) / result.global_step
    tokens = distributed.all_sum(trainer.tokens_seen)  # DDP: all ranks' tokens, the job's rate
    figures = {
        "train_loss_avg": loss_avg,
        "train_steps": int(result.global_step),
        "train_seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds else 0.0,
    }
    if eval_loss is not None:
        figures["eval_loss"] = eval_loss
    if captures:  # one-off costs: a short run's tokens/s is below the steady rate
        figures["train_graph_captures"] = len(captures)
        figures["train_graph_capture_seconds"] = sum(captures)
    return figures


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
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to eager


def _packs_bins(cfg: TrainConfig) -> bool:
    """Whether dataset items are packed bins of examples (train.pack_tokens null or > 0), not
    examples (unpacked, or pack_tokens=0: each batch packed by the collator)."""
    return cfg.packing and cfg.pack_tokens != 0


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in ("input_ids", "labels")})


def _bins(rows: list[dict], budget: int) -> list[list[dict]]:
    return [
        [rows[i] for i in b] for b in packing.pack_bfd([len(r["input_ids"]) for r in rows], budget)
    ]


def _packed_dataset(bins: list[list[dict]]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [[r["input_ids"] for r in b] for b in bins],
            "labels": [[r["labels"] for r in b] for b in bins],
        }
    )


def _unbin(item: dict) -> list[dict]:
    return [{"input_ids": i, "labels": lab} for i, lab in zip(item["input_ids"], item["labels"])]


def _resume_state(checkpoint: Path) -> tuple[int, float | None]:
    """(global step, train-loss sum up to it); the sum is None for a checkpoint saved elsewhere."""
    step = int(json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))["global_step"])
    try:
        saved = json.loads((checkpoint / LOSS_STATE).read_text("utf-8"))
        return step, float(saved["train_loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        log.info(
            "%s has no %s: train_loss_avg covers the resumed steps only", checkpoint, LOSS_STATE
        )
        return step, None


def _final_eval_loss(trainer, eval_ds) -> float:
    """Eval loss of the model as it leaves training, without a second pass when one just ran."""
    if trainer.args.load_best_model_at_end and trainer.state.best_metric is not None:
        return float(trainer.state.best_metric)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return float(evals[-1]["eval_loss"])
    return float(trainer.evaluate(eval_ds)["eval_loss"])
