"""What autograd keeps for the backward of one decoder layer with LoRA on the seven projections:
peft's dropout against train.lora_dropout_recompute (summarizer/speed/lean_lora.py). Runs on CPU.

    python benchmarks/lean_lora_memory.py                 # Llama-3.2-1B's layer shape, 1,024 tokens
    python benchmarks/lean_lora_memory.py --shape qwen3-4b --out benchmarks/results/lean-lora

The layer runs forward under bf16 autocast (as training on a GPU does), with bf16 frozen weights
and fp32 adapter weights (as peft keeps them); every tensor saved for the backward is counted once
per storage, parameters excluded. Bytes per token times tokens per step times layers is the
activation memory of a step without gradient checkpointing; with it, one layer's worth is
recomputed at a time. Liger's kernels (on a GPU) change the base layer's share, not the adapters'.
On CPU, dropout keeps its mask in the input's dtype (fp32: peft casts the input to the adapter's
dtype); CUDA's fused dropout keeps a bool mask. The "CUDA estimate" row subtracts those 3 bytes per
masked element (the inputs of the seven projections); `lora_dropout_recompute` keeps no masks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # a Llama layer of these sizes: hidden, intermediate, heads, kv heads
    "llama-1b": (2048, 8192, 32, 8),
    "qwen3-4b": (2560, 9728, 32, 8),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_bytes(sizes: tuple[int, int, int, int], tokens: int, dropout: float, lean: bool) -> int:
    """Bytes autograd saves for one layer's backward; sizes: hidden, intermediate, heads, kv."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from summarizer.speed.lean_lora import dropout_recompute

    hidden, inter, heads, kv = sizes
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=SEVEN)
    lm = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), lora)
    for name, p in lm.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    lm.train()
    inner = lm.base_model.model.model
    layer = inner.layers[0]
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens)[None]
    pe = inner.rotary_emb(x, pos)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with dropout_recompute(lm, lean), hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, position_embeddings=pe, attention_mask=None, position_ids=pos)
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--out", type=Path, help="folder for <shape>.json")
    args = ap.parse_args()
    sizes = SHAPES[args.shape]
    rows = {
        "peft, dropout": saved_bytes(sizes, args.tokens, args.dropout, lean=False),
        "lora_dropout_recompute": saved_bytes(sizes, args.tokens, args.dropout, lean=True),
        "peft, no dropout": saved_bytes(sizes, args.tokens, 0.0, lean=False),
    }
    hidden, inter, _, _ = SHAPES[args.shape]
    masked = args.tokens * (6 * hidden + inter)  # q, k, v, o, gate, up read hidden; down inter
    rows["peft, dropout (CUDA estimate: bool masks)"] = rows["peft, dropout"] - 3 * masked
    first = rows["peft, dropout"]
    print(f"### {args.shape}: one decoder layer, {args.tokens} tokens, dropout {args.dropout}\n")
    cuda = rows["peft, dropout (CUDA estimate: bool masks)"]
    print("| LoRA | saved KB/token | vs peft with dropout | vs its CUDA estimate |")
    print("|---|---|---|---|")
    for name, n in rows.items():
        print(f"| {name} | {n / args.tokens / 1024:.1f} | {n / first:.2f}x | {n / cuda:.2f}x |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "saved_bytes": rows}
        (args.out / f"{args.shape}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
