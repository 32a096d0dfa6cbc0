"""Generation through a dense copy: a 4-bit LoRA model dequantized with its adapter merged in
gives the same logits as the QLoRA model it came from."""

from __future__ import annotations

import pytest
import torch

from summarizer.config import LoraConfig, ModelConfig, QuantConfig
from summarizer.model import add_lora, build_model
from summarizer.speed.merge import merged_for_generation

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def local_tiny(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("tiny-local")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_dense_merge_keeps_the_qlora_logits(local_tiny, tmp_path, quant):
    cfg = ModelConfig(name="tiny-local", source="local", path=str(local_tiny), dtype="float32")
    base, tok = build_model(cfg, QuantConfig(name=quant, method=quant), str(tmp_path))
    lm = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    torch.manual_seed(0)
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter something to merge
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.tensor([tok("안녕하세요 요약해 주세요")["input_ids"]])
    lm.eval()
    with torch.no_grad():  # (on CPU, bitsandbytes repacks 4-bit weights at this first forward)
        want = lm(input_ids=ids).logits
        dense = merged_for_generation(lm, torch.float32)
        got = dense(input_ids=ids).logits
    linear_types = {type(m).__name__ for m in dense.modules() if "Linear" in type(m).__name__}
    assert linear_types == {"Linear"}  # no 4-bit layers, no LoRA branches left
    if quant == "none":
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    else:  # bitsandbytes' CPU 4-bit kernel computes in bf16: equal up to that rounding
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_frozen_on_a_4bit_model(local_tiny, tmp_path, upcast):
    """train.upcast_frozen=false keeps a 4-bit model's frozen norms/embeddings in their load dtype
    (no fp32 copies, so no casts around each 4-bit layer); the LoRA weights stay fp32 either way."""
    cfg = ModelConfig(name="tiny-local", source="local", path=str(local_tiny), dtype="bfloat16")
    quant = QuantConfig(name="nf4", method="nf4", compute_dtype="bfloat16")
    base, _ = build_model(cfg, quant, str(tmp_path))
    lm = add_lora(base, LoraConfig(r=4, alpha=8), False, upcast_frozen=upcast)
    frozen = {
        p.dtype for p in lm.parameters() if not p.requires_grad and type(p).__name__ != "Params4bit"
    }
    assert frozen == ({torch.float32} if upcast else {torch.bfloat16})
    assert {p.dtype for p in lm.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
