"""Collation and the completion-tail loss: equal to the model's own full-logits loss."""

from __future__ import annotations

import shutil

import pytest
import torch

from summarizer.config import LoraConfig, TrainConfig
from summarizer.errors import UserError
from summarizer.model import add_lora
from summarizer.prompt import IGNORE_INDEX
from summarizer.speed.switches import use_liger
from summarizer.train.checkpoints import resolve_checkpoint
from summarizer.train.loss import collate, completion_loss
from summarizer.train.trainer import training_args

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX] * 3 + [8, 9]},
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
]


def _rows(
    lengths: list[tuple[int, int]], seed: int = 0, vocab: tuple[int, int] = (4, 1000)
) -> list[dict]:
    """Random (prompt, completion) rows of these lengths, the completion supervised."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_prompt, n_completion in lengths:
        ids = torch.randint(*vocab, (n_prompt + n_completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return rows


COMPLETIONS = [(30, 5), (12, 9), (20, 1)]  # completion_loss's rows: prompts and completions vary


def test_collate_left_pads_with_real_positions():
    b = collate(ROWS, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]]
    assert b["attention_mask"].tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 3 + [6, 7]


def test_completion_loss_matches_full_logits_loss(tiny):
    model, _ = tiny
    batch = collate(_rows(COMPLETIONS, 0, (4, 1000)), pad_token_id=0)
    with torch.no_grad():
        fast, out = completion_loss(model, batch)
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert out.logits.shape[1] == 10  # longest completion (9) + 1, not the 35-token width
    shift_logits, shift_labels = full[:, :-1], batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_lm_head_loss_and_gradients_match_the_logits_path(tiny, packed, device):
    """train.fused_lm_head: TRL's chunked head (as its SFTTrainer installs it) gives the loss and
    LoRA gradients of the logits path, for padded batches and packed rows (on CUDA: its Triton
    path, labelled positions only, and the varlen attention kernel)."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from summarizer.speed.packing import attention, collate_packed

    base = copy.deepcopy(tiny[0])
    add_fused_lm_head(base)
    lm = add_lora(base, LoraConfig(dropout=0.0), gradient_checkpointing=False).to(device)
    rows = _rows(COMPLETIONS, 0, (4, 1000))
    batch = collate_packed(rows, 0) if packed else collate(rows, pad_token_id=0)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    results = {}
    for fused in (False, True):
        lm.zero_grad()
        with attention(lm, packed):
            loss, _ = completion_loss(lm, batch, torch.tensor(20, device=device), fused)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
        results[fused] = (loss.item(), grads)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6)


def test_fused_lm_head_choice(tmp_path, monkeypatch):
    from summarizer.speed.switches import use_fused_head

    assert use_fused_head(TrainConfig(fused_lm_head="true"))
    assert not use_fused_head(TrainConfig(fused_lm_head="false"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_fused_head(TrainConfig())  # auto: CUDA only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_fused_head(TrainConfig(gradient_checkpointing=True))  # memory is what it buys
    assert not use_fused_head(TrainConfig(gradient_checkpointing=False))  # speed: logits
    with pytest.raises(UserError, match="train.fused_lm_head='yes': expected auto, true or false"):
        use_fused_head(TrainConfig(fused_lm_head="yes"))


def test_lora_wraps_all_seven_projections(tiny):
    import copy

    model = copy.deepcopy(tiny[0])
    peft = add_lora(model, LoraConfig(r=4, alpha=8), gradient_checkpointing=False)
    names = {
        n.split(".")[-4] for n, p in peft.named_parameters() if p.requires_grad and "lora_A" in n
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_init_follows_the_seed_not_what_drew_random_numbers_before(tiny):
    """make run twice gave final 25.37 then 27.25: the first run converted the GGUF model first,
    which drew from the same RNG before the adapters were initialised."""
    import copy

    def lora_a(seed, drawn_before):
        torch.rand(drawn_before)
        lm = add_lora(copy.deepcopy(tiny[0]), LoraConfig(r=4, alpha=8), False, seed=seed)
        return [p.detach().clone() for n, p in lm.named_parameters() if "lora_A" in n]

    first, rerun, other = lora_a(7, 0), lora_a(7, 1000), lora_a(8, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, rerun, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    "lora,message",
    [(LoraConfig(r=0), "lora.r=0"), (LoraConfig(target_modules=["c_attn"]), "lora.target_modules")],
)
def test_bad_lora_settings(tiny, lora, message):
    import copy

    with pytest.raises(UserError, match=message):
        add_lora(copy.deepcopy(tiny[0]), lora, gradient_checkpointing=False)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lr": 0.0}, "train.lr=0.0 must be > 0"),
        ({"lr": -1e-4}, "train.lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_strategy": "sometimes"}, "eval_strategy"),
        ({"save_steps": 15, "eval_steps": 10}, "multiple of train.eval_steps"),
        ({"precision": "fp8"}, "train.precision"),
    ],
)
def test_bad_train_settings(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        training_args(TrainConfig(**changes), tmp_path)


def test_cpu_defaults(tmp_path):
    args = training_args(TrainConfig(), tmp_path)
    assert (args.bf16, args.fp16, args.optim.value) == (False, False, "adamw_torch")
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint-N folder"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path)).endswith("checkpoint-7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answers")
def test_liger_choice_without_gpu(tmp_path):
    assert not use_liger(TrainConfig(liger="false"))
    assert not use_liger(TrainConfig(liger="auto"))  # auto: no GPU, no Liger, no error
    assert training_args(TrainConfig(liger="auto"), tmp_path).use_liger_kernel is False
    with pytest.raises(UserError, match="train.liger=true needs a CUDA GPU"):
        use_liger(TrainConfig(liger="true"))
    with pytest.raises(UserError, match="train.liger='fast': expected auto, true or false"):
        use_liger(TrainConfig(liger="fast"))


def test_compile_turns_liger_off(monkeypatch):
    """Liger's Triton kernels fail under dynamo (seen on an H200): train.compile leaves them out."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert use_liger(TrainConfig(liger="auto"))  # a GPU with liger-kernel: on
    assert not use_liger(TrainConfig(liger="auto", compile=True))
    with pytest.raises(UserError, match="train.liger=true and train.compile=true do not combine"):
        use_liger(TrainConfig(liger="true", compile=True))


def test_completion_loss_drops_the_trainers_skip_logits(tiny):
    """With train.liger on, the Trainer's evaluation asks the model to skip its logits; the loss
    computes them itself, so the flag must not reach the model."""
    model, tok = tiny
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}]
    batch = collate(rows, tok.pad_token_id)
    seen = []
    forward = model.forward

    def spy(*a, **k):
        seen.append(set(k))
        return forward(*a, **k)

    model.forward = spy
    try:
        loss, _ = completion_loss(model, {**batch, "skip_logits": True})
    finally:
        del model.forward
    assert torch.isfinite(loss) and seen and all("skip_logits" not in k for k in seen)


def test_one_process_never_uses_data_parallel(tmp_path, monkeypatch):
    # HF counts every visible GPU (n_gpu) and wraps the model in nn.DataParallel, which TRL refuses
    from summarizer.train import trainer as train_mod

    class TwoGpus(train_mod.SFTConfig):
        def __post_init__(self):
            super().__post_init__()
            self._n_gpu = 2  # what HF counts on a host with two GPUs

    monkeypatch.setattr(train_mod, "SFTConfig", TwoGpus)
    assert training_args(TrainConfig(), tmp_path).n_gpu == 1


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_train_as_eager_ones(tmp_path, cache_dir):
    """train.compile=true: torch.compile on each decoder layer, the same steps and losses as eager
    (LoRA dropout off: compiled and eager code draw different random masks)."""
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model
    from summarizer.train.fit import fit

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52)], 0, (5, 500))
    figures = {}
    for compiled in (False, True):
        base, tok = build_model(
            ModelConfig(name="tiny", source="tiny", dtype="float32"), QuantConfig(), cache_dir
        )
        lm = add_lora(base, LoraConfig(dropout=0.0), gradient_checkpointing=False)
        cfg = TrainConfig(
            max_steps=3,
            batch_size=4,
            grad_accum=1,
            eval_strategy="no",
            save_steps=100,
            logging_steps=1,
            packing=True,
            pack_tokens=0,
            compile=compiled,
            warmup_ratio=0.0,
        )
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        figures[compiled] = fit(cfg, lm, tok, rows, [], tmp_path / str(compiled))
        # layers ran compiled (dynamo made graphs) only when asked, and are eager again after
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled
        layers = lm.get_base_model().model.layers
        assert all(layer._compiled_call_impl is None for layer in layers)
    assert figures[True]["train_steps"] == figures[False]["train_steps"] == 3
    assert figures[True]["train_loss_avg"] == pytest.approx(
        figures[False]["train_loss_avg"], rel=1e-4
    )


@pytest.mark.slow
def test_fit_with_the_fused_lm_head_trains_as_without(tmp_path, cache_dir, monkeypatch):
    """train.fused_lm_head=true reaches the trainer's loss: the same packed steps, the same losses."""
    import summarizer.train.trainer as train_mod
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model
    from summarizer.train.fit import fit

    seen = []

    def spy(model, batch, num_items=None, fused=False):
        seen.append(fused)
        return completion_loss(model, batch, num_items, fused)

    monkeypatch.setattr(train_mod, "completion_loss", spy)

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61)], 1, (5, 500))
    losses = {}
    for fused in ("false", "true"):
        base, tok = build_model(
            ModelConfig(name="tiny", source="tiny", dtype="float32"), QuantConfig(), cache_dir
        )
        lm = add_lora(base, LoraConfig(dropout=0.0), gradient_checkpointing=False)
        cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=1, eval_strategy="no")
        cfg.packing, cfg.pack_tokens, cfg.fused_lm_head, cfg.save_steps = True, 0, fused, 100
        losses[fused] = fit(cfg, lm, tok, rows, [], tmp_path / fused)["train_loss_avg"]
        assert set(seen) == {fused == "true"}
        seen.clear()
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_compile_needs_decoder_layers():
    from summarizer.speed.compile import compiled_layers

    with pytest.raises(UserError, match="train.compile=true: no decoder layers"):
        with compiled_layers(torch.nn.Linear(2, 2)):
            pass


def test_mixed_precision_training_leaves_the_model_in_its_own_dtype(tmp_path, cache_dir):
    """bf16 training wraps model.forward in autocast; after fit the model computes in its own
    dtype again (as `predict` will), so the static decoder's one-dtype KV cache takes its keys
    and values (a sweep trial on a GPU failed there: Float cache, BFloat16 values)."""
    from unittest.mock import ANY

    from summarizer.config import GenerateConfig, ModelConfig, QuantConfig
    from summarizer.generate import summaries
    from summarizer.model import build_model
    from summarizer.train.fit import fit

    base, tok = build_model(
        ModelConfig(name="tiny", source="tiny", dtype="float32", attn_implementation="eager"),
        QuantConfig(),
        cache_dir,
    )
    lm = add_lora(base, LoraConfig(), gradient_checkpointing=False)
    rows = [{"input_ids": list(range(5, 45)), "labels": [IGNORE_INDEX] * 32 + list(range(37, 45))}]
    cfg = TrainConfig(max_steps=1, batch_size=1, eval_strategy="no", save_steps=100)
    cfg.precision = "bf16"
    fit(cfg, lm, tok, rows, [], tmp_path)
    gen = GenerateConfig(batch_size=1, max_new_tokens=4, static_decode="true")
    assert summaries(gen, lm, tok, [[5, 6, 7, 8]], [tok.eos_token_id]) == [ANY]
    with torch.inference_mode():
        assert lm(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.dtype == torch.float32
