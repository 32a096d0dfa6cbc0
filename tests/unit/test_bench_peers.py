"""benchmarks/peers.py and bench.py's report: the FLOPs formula, the peak table, repeats, the TRL
peers' settings, the matched ratios the table leads with, and outputs compared token for token."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
peers = bench.peers


def test_matmul_parameters_of_the_1b_shape_are_llama_3_2_1b_without_embeddings():
    m = peers.model_dims(bench.SHAPES["llama-1b"])
    # Llama-3.2-1B: 1,235,814,400 parameters = 973,078,528 in the layers' matmuls
    # + 262,668,288 embedding (tied head) + 67,584 norm weights
    assert m["N"] == 973_078_528
    assert m["N"] + 128256 * 2048 + (2 * 16 + 1) * 2048 == 1_235_814_400
    # LoRA r16 on the seven projections: r x (in + out) each
    assert m["N_lora"] == 16 * 16 * (2 * 4096 + 2 * (2048 + 512) + 3 * (2048 + 8192))


def test_flops_per_token_by_the_formula():
    spec = dict(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
    )
    m = peers.model_dims(spec)
    n_matmul = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)
    assert m["N"] == n_matmul
    rows = [{"prompt": [5] * 3, "completion": [6] * 2}, {"prompt": [5] * 4, "completion": [6]}]
    f = peers.flops_per_token(spec, rows)
    tokens, supervised, squares = 10, 3, 25 + 25
    total = (
        (4 * n_matmul + 6 * m["N_lora"]) * tokens
        + 4 * 100 * 8 * supervised
        + 6 * 2 * 8 * squares  # 6 L W n^2 per example (causal)
    )
    assert f["flops_per_token"] == pytest.approx(total / tokens)
    assert f["share_dense"] + f["share_lm_head"] + f["share_attention"] == pytest.approx(1.0)


def test_peak_by_device_name_and_override(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i, name=name: name)
        assert peers.peak_tflops(None) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Some Future GPU")
    assert peers.peak_tflops(None) is None
    assert peers.peak_tflops(500.0) == 500.0
    figures = {"tokens_per_second": 1e6, "tokens_per_second_whole_run": 5e5, "steps": 3}
    peers.add_mfu(figures, per_token=1e8, peak=500.0)
    assert figures["mfu"] == pytest.approx(0.2)  # 1e14 FLOP/s of 5e14
    assert figures["mfu_whole_run"] == pytest.approx(0.1) and "mfu_steps" not in figures
    peers.add_mfu(figures, per_token=1e8, peak=None)
    assert figures["mfu"] is None


def test_repeats_summarised_as_median_min_max():
    runs = [
        {"tokens_per_second": t, "tokens_per_second_whole_run": t / 2, "peak_gib": g,
         "eval_loss": 7.0, "steps": 10, "step_seconds": [0.1]}
        for t, g in ((300.0, 2.0), (100.0, 2.5), (200.0, 2.2))
    ]  # fmt: skip
    out = peers.summarise(runs + [{"error": "the trl_best process exited with 1"}])
    assert out["tokens_per_second"] == 200.0
    assert (out["tokens_per_second_min"], out["tokens_per_second_max"]) == (100.0, 300.0)
    assert out["tokens_per_second_whole_run"] == 100.0
    assert out["peak_gib"] == 2.5 and out["repeats"] == 3 and out["eval_loss_spread"] == 0.0
    assert out["repeat_errors"] == ["the trl_best process exited with 1"]
    assert out["step_seconds"] == [0.1]  # the first repeat's lists
    assert [r["tokens_per_second"] for r in out["per_repeat"]] == [300.0, 100.0, 200.0]
    assert peers.summarise([{"error": "x"}]) == {"error": "x"}


def _args(**kw):
    base = dict(batch_size=8, max_length=1024, max_steps=-1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_trl_peers_settings(tmp_path):
    args = _args()
    o = bench.bench_overrides(args)
    plain = peers.trl_config("trl_plain", args, tmp_path, o, on_gpu=False)
    assert plain.gradient_checkpointing and not plain.padding_free and not plain.packing
    assert plain.per_device_train_batch_size == 8 and plain.max_length == 1024
    best = peers.trl_config("trl_best", args, tmp_path, o, on_gpu=False)
    # padding-free on the plain batches: one row of 8 examples a step, TRL's chunked LM head
    assert best.padding_free and not best.packing and best.max_length is None
    assert best.per_device_train_batch_size == 8 and best.gradient_checkpointing
    assert str(best.optim.value) == "adamw_torch_fused" and best.completion_only_loss
    assert not best.use_liger_kernel  # Liger needs CUDA
    nockpt = peers.trl_config("trl_best_nockpt", args, tmp_path, o, on_gpu=False)
    assert not nockpt.gradient_checkpointing and nockpt.padding_free
    bfd = peers.trl_config("trl_best_bfd_nockpt", args, tmp_path, o, on_gpu=False)
    # ours' row budget: bins of batch x max length tokens, one a step
    assert bfd.packing and bfd.packing_strategy == "bfd" and not bfd.gradient_checkpointing
    assert bfd.per_device_train_batch_size == 1 and bfd.max_length == 8 * 1024
    assert str(plain.optim.value) == "adamw_torch"  # paged AdamW 32-bit on a GPU
    # every ours variant with a peer has one of the same checkpointing
    for ours, peer in peers.MATCHED.items():
        ckpt = bool(bench.OURS[ours].get("gradient_checkpointing"))
        assert peers.TRL[peer]["ckpt"] == ckpt and peers.TRL[peer]["best"], ours


def _fig(tps, whole, peak, loss):
    return {"tokens_per_second": tps, "tokens_per_second_whole_run": whole, "peak_gib": peak,
            "eval_loss": loss, "seconds_per_step": 0.1, "tokens_per_step": 1000.0}  # fmt: skip


def test_table_leads_with_matched_and_strongest_ratios():
    result = {
        "shape": "llama-1b",
        "env": {"device": "NVIDIA H200", "torch": "2.11", "transformers": "5.23", "trl": "1.16"},
        "args": {"repeats": 3, "train_rows": 1600},
        "train": {
            "trl_plain": _fig(4000, 3800, 2.6, 7.10),
            "trl_best": _fig(10000, 9000, 2.0, 7.10),
            "trl_best_bfd_nockpt": _fig(20000, 15000, 8.0, 8.50),
            "unsloth": {"error": "not installed", "not_installed": True},
            "ours_batch_ckpt": _fig(36000, 18000, 2.1, 7.171),
            "ours": _fig(66000, 45000, 16.0, 8.50),
        },
    }
    text = bench.table(result)
    lines = text.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("| ours_batch_ckpt | trl_best")]
    assert first and first[0] < lines.index(next(x for x in lines if x.startswith("| training")))
    # ours_batch_ckpt / trl_best (matched): whole run 2.00x, steady 3.60x, memory 1.05x, +1.00 %
    assert "| ours_batch_ckpt | trl_best (matched) | **2.00x** | 3.60x | 1.05x | +1.00 % |" in text
    # and against the strongest TRL configuration by whole-run tokens/s
    assert "| ours_batch_ckpt | trl_best_bfd_nockpt (strongest TRL) | **1.20x** |" in text
    assert "| ours | trl_best_bfd_nockpt (matched) (strongest TRL) | **3.00x** | 3.30x |" in text
    assert "| unsloth | not installed |" in text


def test_outputs_cut_at_eos_without_special_tokens():
    # what the project's path keeps: decoded with skip_special_tokens, cut at the stop token
    assert bench.strip_after_eos([20, 3, 21, 1, 22], eos=1, special={0, 1, 2, 3}) == [20, 21]
    assert bench.strip_after_eos([20, 0, 0], eos=1, special={0}) == [20]
