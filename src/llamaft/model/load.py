"""Base model loading: hub id / local directory / GGUF, in the dtype the hardware wants, 4/8-bit for qlora.

    dtype, bf16, fp16 = resolve_precision(cfg.train, cfg.model)
    model = load_base(cfg.model, cfg.quantization, rules, tokenizer, dtype)

QLoRA is LoRA on a quantised base: the only difference lives here (a BitsAndBytesConfig) and in
`adapters.py` (prepare_quantized); the training loop is the same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import LlamaftError

# The dtypes a config, a merge or an export may name (model.dtype, quantization.compute_dtype, --dtype).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Set on the model by load_base when the tokenizer gained tokens (e.g. a new <|pad|>): their ids.
# apply_adapters reads it to make those rows trainable and to save the embeddings with the adapter.
ADDED_TOKENS_ATTR = "llamaft_added_token_ids"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(what: str, fix: str) -> None:
    """One check for everything that needs bitsandbytes (4/8-bit bases, 8-bit optimizers)."""
    if not cuda_available():
        raise LlamaftError(f"{what} needs a CUDA GPU with bitsandbytes; {fix}")
    if not bitsandbytes_available():
        raise LlamaftError(f"{what} needs bitsandbytes: run `pip install bitsandbytes` (or `pip install llamaft[gpu]`); {fix}")


def resolve_precision(train_cfg, model_cfg) -> tuple[torch.dtype, bool, bool]:
    """(weights dtype, bf16 mixed precision, fp16 mixed precision) from the config and the hardware.

    auto: bf16 on GPUs that support it, fp16 autocast on older GPUs, fp32 on CPU (CPU bf16 autocast
    is slow on most CPUs and buys nothing for tiny demo models).
    """
    cuda = cuda_available()
    precision = train_cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise LlamaftError("train.precision=fp16 needs a CUDA GPU; use train.precision=auto (fp32 on CPU) or bf16")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise LlamaftError("this GPU does not support bf16; use train.precision=fp16 (or auto)")
    bf16, fp16 = precision == "bf16", precision == "fp16"

    if model_cfg.dtype != "auto":
        dtype = DTYPES[model_cfg.dtype]
    elif bf16:
        dtype = torch.bfloat16
    elif fp16 and model_cfg.method != "full":
        # Frozen base in fp16; PEFT keeps the adapter weights in fp32 so the grad scaler can unscale them.
        dtype = torch.float16
    else:
        dtype = torch.float32  # CPU, or full fine-tuning under fp16 autocast (needs fp32 master weights)
    if fp16 and model_cfg.method == "full" and dtype == torch.float16:
        raise LlamaftError("full fine-tuning cannot train float16 weights with fp16 mixed precision; use model.dtype=float32 (or auto)")
    return dtype, bf16, fp16


def _source(model_cfg) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for hub ids, local dirs and GGUF files."""
    name = model_cfg.name
    kwargs: dict = {}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise LlamaftError(f"model.name: GGUF file not found: {name}")
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    if model_cfg.gguf_file:
        return name, {**kwargs, "gguf_file": model_cfg.gguf_file}
    return name, kwargs


def quantization_config(quant_cfg, method: str, sharded: bool = False):
    """BitsAndBytesConfig for qlora (nf4 + double quant + bf16 compute by default), after checking hardware.
    sharded: the base will be sharded by FSDP (see `bnb_arguments`)."""
    require_bitsandbytes("QLoRA", "use model.method=lora on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**bnb_arguments(quant_cfg, sharded, torch.cuda.is_bf16_supported()))


def bnb_arguments(quant_cfg, sharded: bool = False, bf16_supported: bool = True) -> dict:
    """BitsAndBytesConfig's arguments. Sharded (FSDP + QLoRA): the packed 4-bit weights are stored in the
    compute dtype (`bnb_4bit_quant_storage`, as the FSDP-QLoRA recipe does): FSDP shards floating-point
    tensors only, and accelerate leaves uint8-stored ones whole on every process (no memory saved)."""
    compute = DTYPES[quant_cfg.compute_dtype]
    if compute == torch.bfloat16 and not bf16_supported:
        compute = torch.float16  # older GPUs (T4, V100) have no bf16 matmuls
    if quant_cfg.bits == 8:
        return {"load_in_8bit": True}
    args = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_cfg.quant_type,
            "bnb_4bit_use_double_quant": quant_cfg.double_quant, "bnb_4bit_compute_dtype": compute}
    if sharded:
        args["bnb_4bit_quant_storage"] = compute
    return args


def load_base(model_cfg, quant_cfg, rules, tokenizer, dtype: torch.dtype | None = None, sharded: bool = False):
    """The base causal LM, ready for adapters: pad/stop ids set, embeddings sized to the tokenizer, no KV cache.
    sharded: FSDP will shard it (qlora: the 4-bit weights stored in the compute dtype, `bnb_arguments`)."""
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = torch.float32 if not cuda_available() else torch.bfloat16
    source, kwargs = _source(model_cfg)
    if "gguf_file" in kwargs:
        if model_cfg.method == "qlora":
            raise LlamaftError("model.method=qlora cannot start from a GGUF file; use model.method=lora (the GGUF is dequantized) or a HF model")
        from transformers import GgufConfig

        # transformers 5 keeps GGUF blocks packed when it has a matmul kernel, and such a model is not
        # trainable; training wants plain dense weights.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if model_cfg.method == "qlora":
        kwargs["quantization_config"] = quantization_config(quant_cfg, model_cfg.method, sharded)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # bnb weights are quantised on the GPU
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlamaftError(f"cannot load model '{model_cfg.name}': {first}") from None
    prepare_for_training_tokens(model, tokenizer, rules)
    model.config.use_cache = False  # the KV cache is useless (and memory) while training
    return model


def prepare_for_training_tokens(model, tokenizer, rules) -> None:
    """Embeddings cover every tokenizer id; pad and stop ids match the tokenizer rules."""
    rows = model.get_input_embeddings().weight.shape[0]
    wanted = len(tokenizer)
    added: list[int] = []
    n_added = len(getattr(rules, "added_tokens", None) or [])
    if wanted - n_added > rows:
        # Growing the matrix for ids the model never saw trains garbage: only tokens we added on request
        # (model.add_pad_token) get new rows. train() checks this before any weights load (preflight.py).
        raise LlamaftError(f"the tokenizer has {wanted - n_added:,} ids but the model has {rows:,} embedding rows; "
                           "set model.tokenizer to the tokenizer the model was trained with")
    if wanted > rows:
        # Deterministic init (mean of the old rows, no noise) so a later merge/load can rebuild the
        # same matrix; the rows are also saved with the adapter (see adapters.py).
        model.resize_token_embeddings(wanted, mean_resizing=False)
        added = list(range(rows, wanted))
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:  # tied heads share the weight: setting it twice is harmless
                    emb.weight[rows:] = emb.weight[:rows].float().mean(0).to(emb.weight.dtype)
    setattr(model, ADDED_TOKENS_ATTR, added)
    model.config.pad_token_id = rules.pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = rules.pad_id
        stops = list(rules.stop_ids)
        gen.eos_token_id = stops[0] if len(stops) == 1 else stops
