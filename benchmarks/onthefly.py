"""A Llama-shaped model with random weights, built on the GPU layer by layer: for benchmarks only.

    python benchmarks/bench.py random:llama-3.1-70b qlora 512 8 4 10 out.json    # bench.py's DIR argument
    model = build("llama-3.1-70b", "qlora", "cuda")                            # from Python
    model = build_for_rank("llama-3.1-70b", rank)   # FSDP2: rank 0 whole in CPU memory, other ranks on meta

A Llama-3.1-70B-shaped model is 141 GB in bf16: it cannot be written to (or read from) the device's
64 GiB disk, nor held whole on one GPU before quantization. So the model is made on the meta device
(shapes only, no memory), then each piece is materialised on the target device, filled with random
values (normal, std = initializer_range; norms 1, as HF's init) and, for QLoRA, each decoder layer's
seven projections are quantized to NF4 at once (bitsandbytes' Linear4bit, exactly as from_pretrained
with a BitsAndBytesConfig makes them), before the next layer exists: the bf16 peak is one layer.
Under FSDP2 (bench.py --strategy fsdp) `build_for_rank`: rank 0 builds the whole model in CPU memory
(random init threaded over the cores), the other ranks keep it on meta, and accelerate broadcasts it.
The architecture is the one LlamaForCausalLM(config) builds (tests/test_bench_onthefly.py compares them).
Not for training anything real: the weights are noise.
"""

from __future__ import annotations

from typing import Callable

import torch

# The public configs' shapes (config.json of meta-llama/Llama-3.1-{8B,70B}; the 8B one as seed_baseline.py saves it).
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8),
    # not a public model: for CPU dry runs of the same code paths (fsdp_onthefly_check.py)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
COMMON = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
              rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(shape: str, **overrides):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    return LlamaConfig(**{**COMMON, **SHAPES[shape], **overrides})


def build(config, mode: str, device, dtype=torch.bfloat16, seed: int = 0,
          quantize: Callable | None = None):
    """LlamaForCausalLM(config) with random weights, materialised piece by piece on `device`.
    config: a LlamaConfig or a SHAPES name. mode qlora: each decoder layer's projections quantized to NF4
    as soon as the layer exists (`quantize(model, i)` quantizes layer i: replaceable for tests; default bitsandbytes)."""
    model, config = _skeleton(config, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    quantize = quantize or (nf4_quantizer(device) if mode == "qlora" else None)
    _materialise(model.model.embed_tokens, device, config, gen)
    for i, layer in enumerate(model.model.layers):
        _materialise(layer, device, config, gen)
        if quantize is not None:
            quantize(model, i)
    for piece in (model.model.norm, model.lm_head):
        _materialise(piece, device, config, gen)
    _real_rotary(model, config, device)
    if mode == "qlora":
        _mark_4bit(model)
    return model


def build_for_rank(config, rank: int, dtype=torch.bfloat16, seed: int = 0):
    """The model each process of an FSDP2 run starts from (bench.py random:SHAPE --strategy fsdp, with
    accelerate's cpu_ram_efficient_loading): rank 0 the whole random model in CPU memory (a 70B bf16 model
    is 141 GB: once per machine, not once per process), every other rank the same model on the meta device
    (no memory) with its rotary table real. accelerate moves every rank's model to meta, shards it, then
    broadcasts rank 0's state dict into the shards; non-persistent buffers (the rotary table) are not in a
    state dict, so each rank keeps its own, which must be real."""
    if rank == 0:
        return build(config, "lora", "cpu", dtype, seed)
    model, config = _skeleton(config, dtype)
    _real_rotary(model, config, "cpu")
    return model


def trainable_placeholders(model) -> int:
    """On a meta rank, after get_peft_model: the trainable tensors (the LoRA weights) get CPU storage of
    their own, uninitialised (rank 0's values arrive by accelerate's broadcast). accelerate 1.15 swaps the
    optimizer's parameters for the sharded ones by data_ptr(), and every meta tensor's is 0: left on meta,
    all of a rank's optimizer entries would map to one tensor. Returns how many tensors it placed."""
    placed = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and p.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=True))
                placed += 1
    return placed


def _skeleton(config, dtype):
    """(model on the meta device, its config): shapes only, in `dtype`, SDPA attention, no KV cache."""
    from transformers import LlamaForCausalLM

    config = llama_config(config) if isinstance(config, str) else config
    config.attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model, config


def _real_rotary(model, config, device) -> None:
    # the rotary table is a non-persistent buffer computed at construction: made again on the device
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)


def _materialise(module: torch.nn.Module, device, config, gen) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module.to_empty(device=device, recurse=True)
    noise = []
    with torch.no_grad():
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                if isinstance(sub, LlamaRMSNorm):
                    p.fill_(1.0)
                else:
                    noise.append(p)
        if torch.device(device).type == "cpu":
            _normal_threaded(noise, config.initializer_range, gen)
        else:
            for p in noise:
                p.normal_(0.0, config.initializer_range, generator=gen)


CHUNK = 1 << 24  # elements per random stream on CPU: the values depend on the seed, not on the thread count


def _normal_threaded(tensors, std: float, gen, threads: int | None = None) -> None:
    """normal_(0, std) over `tensors` on every core: a CPU normal_ with a generator is serial (~0.1 G values/s
    a core: 70B would take 12 min), so each CHUNK gets its own generator, seeded from `gen` in order, and the
    chunks run on a thread pool (torch releases the GIL inside the op)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    pieces = [flat[i:i + CHUNK] for t in tensors for flat in (t.detach().view(-1),) for i in range(0, flat.numel(), CHUNK)]
    seeds = torch.randint(0, 2**62, (len(pieces),), generator=gen).tolist()

    def fill(job):
        piece, seed = job
        piece.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))

    with ThreadPoolExecutor(threads or len(os.sched_getaffinity(0))) as pool:
        list(pool.map(fill, zip(pieces, seeds)))


def nf4_quantizer(device, compute=torch.bfloat16) -> Callable:
    """(model, i) -> layer i's projections replaced by NF4 bitsandbytes Linear4bit (double quant, bf16
    compute), quantized on `device` now; the bf16 weights are freed."""
    import bitsandbytes as bnb

    def quantize(model, i):
        layer = model.model.layers[i]
        for block in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                dense = getattr(block, name, None)
                if dense is None:
                    continue
                q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=compute,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                q = q.to(device)  # Params4bit quantizes when it reaches the GPU
                setattr(block, name, q)

    return quantize


def _mark_4bit(model) -> None:
    """What from_pretrained sets on a bitsandbytes model, so PEFT and the fast path treat it as one."""
    from transformers import BitsAndBytesConfig

    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True)
    from transformers.quantizers import AutoHfQuantizer

    # the Trainer asks the quantizer whether the model may be trained (transformers >= 5.17 reads
    # model.hf_quantizer; is_quantized is a property of it on newer versions)
    model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config, pre_quantized=True)
    model.is_loaded_in_4bit = True
    if not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = True
