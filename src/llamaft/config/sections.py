"""The run config's sections: typed groups with one line of help per field.

Every section forbids unknown keys (a typo is an error naming the key, see load.py) and validates
on assignment. Our config names what users choose; `train/` maps it onto HF `TrainingArguments`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import _Section
from .preference import DpoConfig, OrpoConfig, SimpoConfig, check_objective


class ModelConfig(_Section):
    """Which base model to fine-tune and how."""

    name: str = Field(..., description="Hub id, local HF directory, a .gguf file, or embedded:smollm2 (the bundled SmolLM2-135M-Instruct, for CPU trials).")
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside `name` (auto when `name` is a .gguf path).")
    tokenizer: Optional[str] = Field(
        None, description="Tokenizer source: `llama3` / `llama3.1` (Meta's offline file), a hub id or a directory; default: the model's."
    )
    family: Literal["auto", "llama3", "llama3.1", "other"] = Field("auto", description="Template/special-token rules; auto-detected.")
    instruct: Optional[bool] = Field(None, description="Chat (instruct) model? Default: yes when a chat template is available.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="LoRA adapters, LoRA on a 4-bit base, or all weights.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype; auto = bf16 on GPUs that support it, else fp32 on CPU.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust the source.")
    add_pad_token: bool = Field(False, description="Add a new <|pad|> token (resizing embeddings) when no unused special token exists.")
    from_run: Literal["merge", "continue", "stack"] = Field(
        "merge", description="When `name` is a llamaft run directory with a LoRA/QLoRA adapter (e.g. an SFT run): merge = "
        "a new adapter on its adapter merged into its base (bf16, written once to a cache); continue = train its adapter "
        "further on its own base (its lora settings, not this run's; DPO's reference: that adapter as it was); stack = "
        "its adapter frozen on its own base under a new adapter (this run's lora settings; DPO's reference: the new one off)."
    )


class LoraConfig(_Section):
    """LoRA adapter settings (also used by qlora)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="Module names, or all-linear (every projection except lm_head).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class QuantizationConfig(_Section):
    """Base-model quantisation for qlora (needs a CUDA GPU and bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4-bit (QLoRA) or 8-bit base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="Dtype of the matmuls.")


class ColumnsConfig(_Section):
    """Column (field) names in the data files."""

    text: str = "text"
    question: str = "question"
    answer: str = "answer"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    system: str = "system"
    prompt: str = "prompt"  # preference rows (train.objective dpo / orpo / simpo): prompt + chosen / rejected
    chosen: str = "chosen"
    rejected: str = "rejected"


class DataConfig(_Section):
    """What to train and validate on, and how rows become tokens."""

    train: list[str] = Field(..., min_length=1, description="Training files (jsonl, json, csv, parquet, or a save_to_disk directory).")
    format: Literal["auto", "text", "qa", "alpaca", "messages", "preference"] = Field(
        "auto", description="Row format; auto picks it from the columns (chosen + rejected: preference pairs, for train.objective dpo / orpo / simpo).")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    system_prompt: Optional[str] = Field(None, description="System message added to rows that have none.")
    chat_template: Optional[str] = Field(None, description="Path to a .jinja chat template overriding the tokenizer's.")
    date: Optional[str] = Field(None, description="'Today Date' for the Llama 3.1 system header, e.g. '26 Jul 2024' (default: the template's).")
    validation: Union[None, str, list[str], dict[str, str]] = Field(
        None, description="A file, a list of files, a mapping name -> file, or a directory of *val.json / *val.jsonl files "
        "(each a named set; files in a list or directory are named by their stem)."
    )
    test: Optional[str] = Field(None, description="Test file (default: a split of the training data when test_ratio > 0).")
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of training rows held out for validation when no validation file is given.")
    test_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of training rows held out for testing when no test file is given.")
    split_seed: int = Field(42, description="Seed of the train/validation/test split.")
    max_seq_length: int = Field(2048, gt=8, description="Longest example in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="Longer examples: drop them (default; never trains a cut-off answer without its end token) or cut them at max_seq_length."
    )
    train_on: Literal["completion", "all"] = Field("completion", description="Loss on assistant turns only, or on every token.")
    assistant_turns: Literal["all", "last"] = Field("all", description="With train_on=completion: every assistant turn, or only the last.")
    packing: Literal["auto", "on", "off"] = Field("auto", description="Padding-free packing of several examples per row (auto: on GPU fast path).")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _ratios(self) -> "DataConfig":
        if self.val_ratio + self.test_ratio >= 1.0:
            raise ValueError("val_ratio + test_ratio must be below 1")
        return self


Every = Union[int, float]


class TrainConfig(_Section):
    """Optimisation and run bookkeeping (mapped onto HF TrainingArguments)."""

    output_dir: str = Field("runs/run", description="Run directory: config, adapter/weights, tokenizer, metrics, plots, checkpoints.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, description="Optimizer steps; when set, overrides epochs (unset/null: train for `epochs`).")
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = Field("cosine")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warm-up as a share of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (wins over warmup_ratio when > 0).")
    micro_batch_size: int = Field(4, gt=0, description="Examples per process (device) per forward pass.")
    gradient_accumulation: int = Field(
        1, gt=0, description="Micro-batches per optimizer step, over all processes: with N processes each runs "
        "gradient_accumulation / N, so an optimizer step trains micro_batch_size x gradient_accumulation sequences whatever N."
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit"] = Field(
        "adamw_torch", description="adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit AdamW (one process or DDP); "
        "adamw_torch_8bit: torchao's 8-bit AdamW, which also steps FSDP2's sharded weights.")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="Recompute activations to save memory (auto: off on CPU).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Mixed precision; auto = bf16 where supported, fp16 on older GPUs, fp32 on CPU.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A step whose loss or gradient norm is NaN/Inf: stop before applying it (exit code 3), or skip its update."
    )
    max_nonfinite_skips: int = Field(3, ge=1, description="With on_nonfinite=skip: updates skipped before training stops anyway.")
    seed: int = Field(42)
    eval_every: Every = Field(0.25, description="Evaluate every N steps (int) or every fraction of the run (0 < x < 1); 0 = only at the end.")
    save_every: Every = Field(0.5, description="Checkpoint every N steps (int) or fraction of the run; 0 = only at the end.")
    logging_every: Every = Field(1, description="Log train loss every N steps (int) or fraction of the run.")
    save_total_limit: Optional[int] = Field(2, description="Keep at most this many checkpoints.")
    resume: Union[bool, str] = Field(False, description="true: continue from the latest complete checkpoint in output_dir; or a checkpoint path.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="Loggers besides metrics.jsonl.")
    objective: Literal["sft", "dpo", "orpo", "simpo"] = Field(
        "sft", description="sft: next-token loss on the answers; dpo / orpo / simpo: preference alignment on chosen/rejected "
        "pairs (see dpo:, orpo:, simpo:)."
    )

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:  # HF reads <= 0 as "use epochs": a typo would silently train whole epochs
            raise ValueError("must be a positive number of steps; leave it unset (or null) to train for train.epochs")
        return v

    @field_validator("eval_every", "save_every", "logging_every")
    @classmethod
    def _every(cls, v: Every) -> Every:
        if v < 0 or (isinstance(v, float) and not v.is_integer() and v >= 1):
            raise ValueError("use a whole number of steps or a fraction between 0 and 1")
        return v


class FastConfig(_Section):
    """GPU fast path: every part is chosen automatically on CUDA and can be turned off here."""

    enabled: bool = Field(True, description="Use the fast path where it applies (CUDA); off = plain HF path everywhere.")
    attention: Literal["auto", "sdpa", "varlen", "flex", "eager"] = Field("auto", description="Attention kernel; packed batches need varlen or flex.")
    fused_loss: Literal["auto", "on", "off"] = Field("auto", description="Fused linear + cross-entropy (no full-vocab logits).")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile of decoder blocks.")
    offload_checkpoints: Literal["auto", "on", "off"] = Field(
        "auto", description="With gradient checkpointing, park each layer's saved input in CPU memory (auto: on for qlora and when memory is short)."
    )
    regroup_batches: Literal["auto", "off"] = Field(
        "auto", description="Fewer, larger micro-batches (same sequences per optimizer step) when memory allows; with layers recomputed, the shape with the cheapest estimated step."
    )
    fused_optimizer: Literal["auto", "off"] = Field("auto", description="adamw_torch runs as torch's fused AdamW on CUDA.")
    tile_mlp: Literal["auto", "off"] = Field("auto", description="MLP in 16k-token chunks for long micro-batches (long context).")
    cpu_embeddings: Literal["auto", "on", "off"] = Field(
        "auto", description="Keep a frozen, untied input embedding table in CPU memory (auto: on for qlora and when memory is short; ~1 GiB on 8B)."
    )
    partial_checkpointing: Literal["auto", "off"] = Field(
        "auto", description="When the memory estimate asks for checkpointing, recompute only as many layers as needed (off: all)."
    )
    memory_gib: Optional[float] = Field(
        None, gt=0, description="GPU memory this run may use on the device, GiB, CUDA context included; torch's allocator is capped to hold it (default: the card's free memory)."
    )
    cpu_lm_head: Literal["auto", "on", "off"] = Field(
        "auto", description="Park a frozen lm_head in CPU memory between losses, streamed back for each (auto: on for qlora and when memory is short; ~1 GiB on 8B)."
    )
    nf4_kernel: Literal["auto", "off"] = Field(
        "auto", description="QLoRA: NF4 base + LoRA as one op with a one-pass Triton dequant, weight never saved (off: bitsandbytes' forward)."
    )
    deferred_mlp: Literal["auto", "off"] = Field(
        "auto", description="Memory-lean plans: a recomputed layer's MLP runs in the backward in 4096-token chunks (less memory, no extra compute)."
    )
    optimizer_in_backward: Literal["auto", "on", "off"] = Field(
        "auto", description="Full fine-tuning: update each weight as its gradient completes, no whole-model gradient "
        "(auto: when the memory budget needs it; no gradient clipping, one micro-batch per step)."
    )
    single_sequence_sdpa: Literal["auto", "off"] = Field(
        "auto", description="Rows holding one example (long context): causal SDPA (cuDNN on H100) instead of varlen's FA2."
    )
    pack_multiple: Union[Literal["auto"], int] = Field(
        "auto", description="Packed rows of several examples padded up to a multiple of this many tokens (one pad segment, "
        "never trained), so few distinct GEMM shapes occur; auto / 0 / off: no padding (256 showed no gain in a 10-step H200 run)."
    )
    preference_packing: Literal["auto", "on", "off"] = Field(
        "auto", description="train.objective=dpo: pack chosen/rejected pairs into padding-free rows, the reference on the same rows "
        "(auto: where the fast path runs, CUDA; on: also on CPU, with the per-example reference attention)."
    )

    @field_validator("pack_multiple", mode="before")
    @classmethod
    def _pack_multiple(cls, v: Any) -> Any:
        if v is False or v == "off":  # YAML's bare off reads as false
            return 0
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % 8:
            raise ValueError("use auto, off (0) or a positive multiple of 8 tokens, e.g. 256")
        return v


class FsdpConfig(_Section):
    """FSDP2 (distributed.strategy=fsdp): each process holds 1/N of the weights, gradients and optimizer states."""

    sharding: Literal["full", "hybrid"] = Field(
        "full", description="full: shard over every process; hybrid: shard within each machine, replicate across "
        "machines (one machine: the same as full)."
    )
    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer states in CPU "
                              "memory (the optimizer steps on the CPU): fits more, trains slower.")
    activation_checkpointing: bool = Field(
        False, description="FSDP's activation checkpointing of every decoder layer (also on when "
        "train.gradient_checkpointing=on): recompute activations in the backward to save memory."
    )


class DistributedConfig(_Section):
    """Several processes (`llamaft train --nproc N`, torchrun, accelerate launch); one process ignores it."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="ddp: every process holds the whole model and trains its share of each optimizer step's "
        "sequences, the gradients averaged across processes; fsdp: FSDP2, the model sharded across processes "
        "(auto: ddp when one replica fits a GPU by the memory estimate, else fsdp; ddp on CPU)."
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)


class GenerationEvalConfig(_Section):
    """Generation-based metrics for one validation set."""

    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "contains", "rouge_l"],
        description="exact_match, contains, accuracy, macro_f1, rouge_l, bleu, chrf, or module:function.",
    )
    labels: Optional[list[str]] = Field(None, description="Label set for accuracy / macro_f1 (e.g. [relevant, irrelevant]).")
    max_samples: int = Field(32, gt=0, description="Rows generated per evaluation (a fixed sample).")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")


class EvalConfig(_Section):
    """Evaluation during and after training."""

    generation: dict[str, GenerationEvalConfig] = Field(
        default_factory=dict, description="Validation-set name (or '*' for every set) -> generation metrics to compute at each evaluation."
    )
    max_prompt_tokens: int = Field(1024, gt=0, description="Longer prompts are cut from the left (and counted in the report).")


class RunConfig(_Section):
    """A whole run."""

    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    fast: FastConfig = Field(default_factory=FastConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)

    @model_validator(mode="after")
    def _objective(self) -> "RunConfig":
        check_objective(self)
        return self
