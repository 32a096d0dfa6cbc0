"""Every training loss variant in one module: the completion-only cross-entropy for left-padded
batches, packed rows and static (CUDA-graph) rows, with the logits or the chunked LM head.

A loss change is made here once; the trainer, the graph step and the benchmarks call these.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from summarizer.prompt import IGNORE_INDEX
from summarizer.speed.graph_step import POSITIONS, TARGETS

log = logging.getLogger(__name__)


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
    262k-vocabulary model on CPU that projection is most of the step (3x faster, measured). Returns
    (sum of token losses / num_items, model outputs); num_items defaults to this batch's token count.
    fused: the same loss through the chunked LM head TRL's SFTTrainer puts on the model
    (`add_fused_lm_head`): log-probabilities in vocabulary tiles, recomputed in the backward, so no
    (tokens x vocabulary) logits, their fp32 copy or their gradient are ever held.
    """
    if POSITIONS in batch:  # a static row (train.cuda_graph): fixed loss positions
        return static_loss(model, batch, num_items, chunked=fused)
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


CHUNK = 32768  # vocabulary tile of the chunked head (TRL's fused_lm_head uses the same)


def static_loss(model, batch: dict, num_items: torch.Tensor | int | None, chunked: bool = False):
    """(summed cross-entropy at the batch's fixed loss positions / num_items (default: its own
    count of targets), model outputs). Only tensor ops of fixed shapes: capturable.
    chunked: the LM head in vocabulary tiles, recomputed in the backward (train.fused_lm_head):
    the (positions x vocabulary) logits, their fp32 copy and their gradient are never held."""
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": batch["cu_seq_lens_q"],
        "cu_seq_lens_k": batch["cu_seq_lens_k"],
        "max_length_q": batch["max_length_q"],
        "max_length_k": batch["max_length_k"],
        "use_cache": False,
    }
    targets = batch[TARGETS]
    supervised = targets != IGNORE_INDEX
    count = supervised.sum() if num_items is None else num_items
    if chunked:
        loss, outputs = _chunked_head_loss(model, inputs, batch[POSITIONS], targets, supervised)
    else:
        outputs = model(**inputs, logits_to_keep=batch[POSITIONS])
        loss = torch.nn.functional.cross_entropy(
            outputs.logits[0].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


def _chunked_head_loss(model, inputs, positions, targets, supervised):
    """Summed cross-entropy of the head's tiles at `positions`: the backbone's hidden states there,
    through TRL's ChunkedLogProbFunction (shapes fixed, no nonzero(): the fill's positions get
    target 0 and weight 0), with the logit scale and softcap the model's own head applies."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from trl.kernels import ChunkedLogProbFunction

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = causal.config.get_text_config()
    hidden = causal.base_model(**inputs).last_hidden_state[0].index_select(0, positions)
    head = causal.get_output_embeddings()
    log_probs = ChunkedLogProbFunction.apply(
        hidden,
        head.weight,
        head.bias,
        targets.clamp(min=0),
        1.0,  # temperature
        CHUNK,
        getattr(text, "final_logit_softcapping", None),
        _logit_scale(text),
        (),  # only the log-probabilities
    )[0]
    loss = -(log_probs * supervised).sum()
    return loss, CausalLMOutputWithPast(loss=loss)


def _logit_scale(text) -> float:
    """The factor a model's head multiplies its logits by, read as TRL's add_fused_lm_head does."""
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, key, None) is not None:
            return float(getattr(text, key))
    scaling = getattr(text, "logits_scaling", None)  # Granite, MiniCPM3 divide; HyperCLOVA X not
    if scaling is not None:
        return float(scaling if text.model_type == "hyperclovax" else 1 / scaling)
    return 1.0
