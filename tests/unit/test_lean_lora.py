"""train.lora_dropout_recompute: peft's LoRA function and gradients, less saved for the backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from summarizer.speed import lean_lora

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_llama(dropout=0.3, hidden=64, inter=128, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=SEVEN, init_lora_weights=False
    )
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
def test_same_loss_and_gradients_as_peft_with_the_same_masks(monkeypatch, autocast):
    lm = _lora_llama()
    lm.train()
    ids = torch.randint(0, 100, (2, 12))
    drawn = []
    keep = lean_lora._keep

    def recording(x, p, seed):
        mask = keep(x, p, seed)
        drawn.append(mask.clone())
        return mask

    monkeypatch.setattr(lean_lora, "_keep", recording)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with lean_lora.dropout_recompute(lm) as changed, amp:
        ours = lm(input_ids=ids, labels=ids).loss
        ours.backward()
    assert changed == 14  # 7 projections x 2 layers
    assert len(drawn) == 28  # each mask drawn in the forward and again in the backward
    for fwd, bwd in zip(drawn[:14], drawn[14:][::-1]):  # the backward runs in reverse order
        assert torch.equal(fwd, bwd)
    ours_grads = _grads(lm)

    # peft's own forward, its dropout modules replaced by the masks drawn above (call order)
    def peft_run(amp):
        lm.zero_grad()
        masks = iter(drawn[:14])
        for module in lm.modules():
            if isinstance(module, torch.nn.Dropout) and module.p > 0:
                module.forward = lambda x: x * next(masks).to(x.dtype)
        with amp:
            loss = lm(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.item(), _grads(lm)

    ref_loss, ref_grads = peft_run(amp)
    if not autocast:  # fp32: the same numbers
        assert ours.item() == pytest.approx(ref_loss, rel=1e-6)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7)
        return
    # bf16: rounding moves this random model's gradients by ~5 % either way; ours must be as
    # close to the fp32 gradients (same masks) as peft's own bf16 run is
    _, exact = peft_run(torch.autocast("cpu", enabled=False))

    def error(grads):
        diff = sum(((grads[n] - exact[n]) ** 2).sum() for n in exact)
        return float((diff / sum((g**2).sum() for g in exact.values())) ** 0.5)

    assert error(ours_grads) <= 1.5 * error(ref_grads), (error(ours_grads), error(ref_grads))
    assert error(ours_grads) < 0.2


def test_about_half_the_saved_activations_of_a_layer():
    """What autograd keeps for one decoder layer (bf16 autocast, as on a GPU), parameters aside:
    about half on CPU, whose dropout keeps fp32 masks (CUDA keeps bool ones: ~0.73x there).
    Measured by benchmarks/lean_lora_memory.py, on a small layer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "lean_lora_memory.py"
    spec = importlib.util.spec_from_file_location("lean_lora_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = (256, 1024, 4, 2)
    peft_bytes = bench.saved_bytes(sizes, 256, 0.05, lean=False)
    lean_bytes = bench.saved_bytes(sizes, 256, 0.05, lean=True)
    assert lean_bytes < 0.6 * peft_bytes, (lean_bytes, peft_bytes)


def test_gradient_checkpointing_redraws_the_same_masks():
    """A checkpointed layer runs its forward twice: both must draw the same masks (the seed comes
    from the CPU generator, which checkpointing restores), so gradients match a plain run."""
    ids = torch.randint(0, 100, (2, 12))
    grads = {}
    for ckpt in (False, True):
        lm = _lora_llama()
        if ckpt:
            lm.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        lm.train()
        torch.manual_seed(7)
        with lean_lora.dropout_recompute(lm):
            lm(input_ids=ids, labels=ids).loss.backward()
        grads[ckpt] = _grads(lm)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad)


def test_only_while_training_and_only_inside_the_context():
    lm = _lora_llama()
    ids = torch.randint(0, 100, (1, 8))
    lm.eval()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        with lean_lora.dropout_recompute(lm):
            inside = lm(input_ids=ids).logits  # eval: peft's forward, no dropout
    torch.testing.assert_close(inside, before)
    assert not any("forward" in vars(m) for m in lm.modules())  # peft's forward is back
    with lean_lora.dropout_recompute(lm, on=False) as changed:
        assert changed == 0
    with lean_lora.dropout_recompute(_lora_llama(dropout=0.0)) as changed:
        assert changed == 0  # no dropout: peft's Identity, nothing to save


@pytest.mark.slow
def test_fit_trains_through_it_when_asked(tmp_path, cache_dir, monkeypatch):
    from summarizer.config import LoraConfig as OurLora
    from summarizer.config import ModelConfig, QuantConfig, TrainConfig
    from summarizer.model import add_lora, build_model
    from summarizer.prompt import IGNORE_INDEX
    from summarizer.train.fit import fit

    calls = []
    apply = lean_lora._DropoutLoRA.apply
    monkeypatch.setattr(lean_lora._DropoutLoRA, "apply", lambda *a: calls.append(1) or apply(*a))
    rows = [{"input_ids": list(range(5, 45)), "labels": [IGNORE_INDEX] * 32 + list(range(37, 45))}]
    for on in (False, True):
        base, tok = build_model(
            ModelConfig(name="tiny", source="tiny", dtype="float32"), QuantConfig(), cache_dir
        )
        lm = add_lora(base, OurLora(dropout=0.1), gradient_checkpointing=False)
        cfg = TrainConfig(max_steps=2, batch_size=1, eval_strategy="no", save_steps=100)
        cfg.lora_dropout_recompute = on
        figures = fit(cfg, lm, tok, rows, [], tmp_path / str(on))
        assert bool(calls) == on and figures["train_steps"] == 2
        lora_layers = [m for m in lm.modules() if isinstance(m, LoraLayer)]
        assert lora_layers and not any("forward" in vars(m) for m in lora_layers)  # peft's again
