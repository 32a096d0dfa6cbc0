"""TRL's SFTTrainer with our loss and exact-resume checkpoints, and the SFTConfig a run's `train`
settings map to.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from summarizer import compat
from summarizer.config import TrainConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.prompt import IGNORE_INDEX
from summarizer.speed import graph_step
from summarizer.speed.switches import TrainPlan, train_plan
from summarizer.train import resume
from summarizer.train.checkpoints import LOSS_STATE, write_manifest
from summarizer.train.loss import completion_loss

log = logging.getLogger(__name__)


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
        try:
            if self.args.should_save:
                # HF keeps the loss sum in memory only: a resumed run would average its own steps.
                total = self.loss_before + compat.trainer_loss_sum(self)
                state = {"train_loss_sum": total, "global_step": self.state.global_step}
                write_atomic(folder / LOSS_STATE, json.dumps(state))
            super()._save_checkpoint(model, trial)  # ends with trainer_state.json
            self.accelerator.wait_for_everyone()  # DDP: every rank's rng_state_N.pth is in
            if self.args.should_save:
                write_manifest(folder)
        except Exception as e:  # torch and safetensors raise their own types for ENOSPC
            if not resume.is_disk_full(e):
                raise
            raise resume.disk_full(folder, Path(self.args.output_dir).parent) from e

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


def training_args(cfg: TrainConfig, output_dir: Path, plan: TrainPlan | None = None) -> SFTConfig:
    """The SFTConfig of a run's `train` settings; `plan` is the run's resolved switches (None:
    resolved here, for a caller outside the pipeline)."""
    plan = plan or train_plan(cfg)
    on_gpu = torch.cuda.is_available()
    bins = _packs_bins(cfg)
    early_stop = cfg.eval_strategy != "no" and cfg.early_stopping_patience > 0
    args = SFTConfig(
        output_dir=str(output_dir),
        # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the model by the Trainer,
        # as TRL's use_liger_kernel does; our loss asks for logits at supervised positions only
        use_liger_kernel=plan.liger,
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
        optim=plan.optim,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
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
        # in nn.DataParallel (TRL refuses; distributed=ddp is the way to use them all). HF's Trainer
        # sets the same for a model spread over GPUs.
        compat.use_one_gpu(args)
    return args


def _packs_bins(cfg: TrainConfig) -> bool:
    """Whether dataset items are packed bins of examples (train.pack_tokens null or > 0), not
    examples (unpacked, or pack_tokens=0: each batch packed by the collator)."""
    return cfg.packing and cfg.pack_tokens != 0
