"""Merged HF Llama-architecture model directory -> one GGUF file that llama.cpp / Ollama load.

    export_gguf("runs/demo/merged", "demo.q8_0.gguf", outtype="q8_0", ollama=True)

Written with the `gguf` package only (no llama.cpp checkout). It follows llama.cpp's own converter
(convert_hf_to_gguf.py, LlamaModel): llama metadata, q/k rows permuted back to the interleaved
rotary layout llama.cpp uses, Llama 3.1 rope scaling as a `rope_freqs` tensor, norms in F32, and the
tokenizer from `gguf_vocab`. f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1 are quantised in Python
(`gguf.quants`); k-quants and i-quants (q4_k_m, q6_k, ...) go through llama.cpp's quantizer: a
`llama-quantize` binary on PATH, else the `llama_cpp` binding's `llama_model_quantize`.
Tensors are streamed one at a time, so memory stays near one tensor; the file appears only when
complete (temp file `.NAME.PID.tmp` + rename; see paths.py for stale temp files and disk errors).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import LlamaftError
from ..paths import check_output_file, clean_stale, publish_file, remove, tmp_file, write_errors, write_text_atomic
from .gguf_check import check_gguf  # noqa: F401 - `export` calls export_gguf then check_gguf
from .gguf_vocab import add_vocab, read_vocab

log = logging.getLogger(__name__)

# outtype -> (GGMLQuantizationType name, LlamaFileType name) for what gguf.quants writes itself.
PY_TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# Types only llama.cpp's quantizer makes (name as llama-quantize spells it -> LlamaFileType name).
LLAMA_QUANTIZE_TYPES = {
    "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS",
}
OUTTYPES = tuple(PY_TYPES) + tuple(LLAMA_QUANTIZE_TYPES)


def _config(model_dir: Path) -> dict:
    p = model_dir / "config.json"
    if not p.is_file():
        raise LlamaftError(f"GGUF export: {model_dir} is not a model directory (no config.json); merge the run first")
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg = {**cfg, **cfg.get("text_config", {})}
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in (cfg.get("architectures") or []):
        raise LlamaftError(f"GGUF export supports Llama-architecture models; {model_dir} is '{cfg.get('model_type')}'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LlamaftError(f"GGUF export: hidden_act '{cfg['hidden_act']}' is not Llama's silu")
    return cfg


def _rope(cfg: dict) -> dict:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote rope_scaling + rope_theta.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling; llama.cpp reads them as `rope_freqs.weight`."""
    rope, dim = _rope(cfg), _head_dim(cfg)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk` (for read-back checks)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LlamaftError(f"GGUF export: no *.safetensors weights in {model_dir}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _plan(cfg: dict, names: list[str], qtype_name: str):
    """[(hf_name or None, gguf_name, shape, GGMLQuantizationType)] in write order."""
    import gguf

    n_layer = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in names
    base = gguf.GGMLQuantizationType[qtype_name]
    low_bit = qtype_name.startswith(("Q4", "Q5"))
    plan = []
    if _rope(cfg)["rope_type"] == "llama3":
        plan.append((None, "rope_freqs.weight", (_head_dim(cfg) // 2,), gguf.GGMLQuantizationType.F32))
    for name in names:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LlamaftError(f"GGUF export: unexpected tensor '{name}' (unmerged adapter weights? export a merged model directory)")
        plan.append((name, new, None, base))
    return plan, tied, low_bit


def _tensor_type(gguf, new: str, shape: tuple, base, low_bit: bool, output_role: bool):
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or new.endswith("_norm.weight"):
        return Q.F32  # llama.cpp keeps 1-D tensors and norms in F32
    if low_bit and output_role:
        return Q.Q8_0  # 4/5-bit logits hurt most; llama-quantize also keeps the output tensor wider
    if base in (Q.F32, Q.F16, Q.BF16):
        return base
    block, _ = gguf.GGML_QUANT_SIZES[base]
    return base if shape[-1] % block == 0 else Q.F16  # rows must be whole blocks (as the converter falls back)


def _nbytes(gguf, shape, qtype) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


class _Tensors:
    """The model's safetensors, opened lazily: header shapes, and tensors as numpy (q/k rows permuted)."""

    def __init__(self, files: dict[str, Path], cfg: dict):
        self.files, self.handles = files, {}
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_head

    def _handle(self, hf_name: str):
        from safetensors import safe_open

        f = self.files[hf_name]
        if f not in self.handles:
            self.handles[f] = safe_open(str(f), framework="pt")  # torch: numpy has no bfloat16
        return self.handles[f]

    def shape(self, hf_name: str) -> tuple:
        return tuple(self._handle(hf_name).get_slice(hf_name).get_shape())

    def load(self, hf_name: str) -> np.ndarray:
        import torch

        t = self._handle(hf_name).get_tensor(hf_name)
        t = t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)
        w = t.numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, self.n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, self.n_kv)
        return w


def _add_metadata(w, cfg: dict, ftype: str, name: str, vocab) -> None:
    """The llama.* keys (sizes, heads, rope, norm eps), the file type and the tokenizer."""
    import gguf

    n_head = cfg["num_attention_heads"]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_rope_dimension_count(_head_dim(cfg))
    if cfg.get("head_dim") and cfg["head_dim"] != cfg["hidden_size"] // n_head:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    _add_rope(w, cfg)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_file_type(gguf.LlamaFileType[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, vocab)


def _add_rope(w, cfg: dict) -> None:
    """Rope base and scaling; Llama 3.1's scaling is the `rope_freqs` tensor instead (see _plan)."""
    import gguf

    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):
        raise LlamaftError(f"GGUF export: rope type '{rope['rope_type']}' is not supported (default, linear, llama3)")


def _tensor_infos(w, planned: tuple, tensors: _Tensors) -> list[tuple]:
    """Pass 1: every tensor's shape (from the safetensors headers) and GGUF type, added to the
    writer so the header can go out before any data; returns [(hf_name or None, shape, type)]."""
    import gguf

    plan, tied, low_bit = planned
    final = []
    for hf_name, new, shape, base in plan:
        if hf_name is not None:
            shape = tensors.shape(hf_name)
        output_role = new == "output.weight" or (tied and new == "token_embd.weight")
        qtype = _tensor_type(gguf, new, shape, base, low_bit, output_role)
        final.append((hf_name, shape, qtype))
        w.add_tensor_info(new, shape, np.dtype(np.float32), _nbytes(gguf, shape, qtype), raw_dtype=qtype)
    return final


def _write(model_dir: Path, cfg: dict, dest: Path, outtype: str, name: str, vocab) -> None:
    """One GGUF at `dest`: metadata, tensor infos, then the tensors one at a time (pass 2)."""
    import gguf

    qname, ftype = PY_TYPES[outtype]
    tensors = _Tensors(_weights(model_dir), cfg)
    planned = _plan(cfg, list(tensors.files), qname)
    w = gguf.GGUFWriter(str(dest), "llama")
    _add_metadata(w, cfg, ftype, name, vocab)
    final = _tensor_infos(w, planned, tensors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf_name, _shape, qtype in final:  # one tensor in memory at a time
        data = llama3_rope_factors(cfg) if hf_name is None else tensors.load(hf_name)
        w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data), qtype))
    w.close()


def _quantizer(outtype: str):
    """llama.cpp's quantizer for k/i-quants: (src, dest) -> None; checked before any work is done."""
    exe = shutil.which("llama-quantize")
    if exe:
        def run(src: Path, dest: Path) -> None:
            r = subprocess.run([exe, str(src), str(dest), outtype.upper()], capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise LlamaftError(f"llama-quantize {outtype.upper()} failed: {tail[0]}")
        return run
    try:
        import llama_cpp
    except ImportError:
        raise LlamaftError(
            f"--quant {outtype} needs llama.cpp's quantizer: put a `llama-quantize` binary on PATH or install "
            f"llama-cpp-python (scripts/build_llama_cpp_wheel.sh); without it use f16, bf16, q8_0 or q4_0"
        ) from None
    import gguf

    def run_binding(src: Path, dest: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[LLAMA_QUANTIZE_TYPES[outtype]])
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params) != 0:
            raise LlamaftError(f"llama.cpp could not quantize to {outtype}")
    return run_binding


def check_outtype(outtype: str):
    """Validate `outtype` before any work; returns llama.cpp's quantizer for k/i-quants, else None."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise LlamaftError(f"--quant {outtype}: unknown GGUF outtype; choose one of: {', '.join(OUTTYPES)}")
    return None if outtype in PY_TYPES else _quantizer(outtype)


def gguf_target(out_path, outtype: str, model_name: str) -> Path:
    """The file `export_gguf` writes for `out_path`: a directory gets NAME.OUTTYPE.gguf inside it,
    a name without .gguf gets the suffix added."""
    out = Path(out_path).expanduser()
    if out.is_dir():
        return out / f"{model_name}.{outtype.lower()}.gguf"
    return out if out.suffix == ".gguf" else out.with_suffix(out.suffix + ".gguf")


def check_target(out_path, outtype: str, model_name: str, ollama: bool = False, name: str | None = "--out") -> Path:
    """Everything about the output that can fail, checked before any model work: the outtype and its
    quantizer, the path (not a directory, its folder writable); returns the .gguf path."""
    check_outtype(outtype)
    out = check_output_file(gguf_target(out_path, outtype, model_name), name, example="model.gguf")
    if ollama:
        check_output_file(out.with_name("Modelfile"), name, example="Modelfile")
    return out


def export_gguf(model_dir, out_path, outtype: str = "f16", ollama: bool = False, *, name: str | None = None) -> Path:
    """Convert a merged HF Llama model directory to GGUF; returns the written path.

    outtype: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 (pure Python), or
    q4_k_m, q5_k_m, q6_k, ... (needs `llama-quantize` on PATH or llama-cpp-python).
    ollama: also write `Modelfile` beside the GGUF (template + stop tokens; modelfile_text).
    name: general.name in the file (default: the model directory's name).
    The GGUF (and Modelfile) appear only when complete; a failed write (full disk, read-only, ...)
    leaves no partial file and an existing output untouched.
    """
    model_dir, outtype = Path(model_dir), outtype.lower()
    name = name or model_dir.resolve().name
    quantize = check_outtype(outtype)
    out = check_target(out_path, outtype, name, ollama, name=None)
    clean_stale(out)
    cfg = _config(model_dir)
    vocab = read_vocab(model_dir, cfg["vocab_size"])
    modelfile = out.with_name("Modelfile")
    tmp, tmp16, tmp_mf = tmp_file(out), tmp_file(out, "f16"), tmp_file(modelfile)
    try:
        with write_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            if outtype in PY_TYPES:
                _write(model_dir, cfg, tmp, outtype, name, vocab)
            else:
                _write(model_dir, cfg, tmp16, "f16", name, vocab)
                quantize(tmp16, tmp)
            if ollama:  # staged like the GGUF, and published right after it
                tmp_mf.write_text(modelfile_text(out.name, vocab), encoding="utf-8")
        publish_file(tmp, out)
        if ollama:
            publish_file(tmp_mf, modelfile)
    finally:
        for p in (tmp, tmp16, tmp_mf):
            remove(p)
    return out


# Go templates (Ollama does not run Jinja) for the two template families llamaft trains.
_OLLAMA_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Llama 3.1 always opens with a system turn carrying the knowledge/today dates (the template's defaults).
_OLLAMA_LLAMA31 = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def modelfile_text(gguf_name: str, vocab) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` beside it: FROM, TEMPLATE (Llama 3 / ChatML) and
    every stop token."""
    tpl = vocab.chat_template or ""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|start_header_id|>" in tpl:
        body = _OLLAMA_LLAMA31 if "Cutting Knowledge Date" in tpl else _OLLAMA_LLAMA3
        lines.append(f'TEMPLATE """{body}"""')
    elif "<|im_start|>" in tpl:
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
    else:
        lines.append("# no TEMPLATE: Ollama derives one from the GGUF's chat template")
    for i in sorted(set(vocab.stop_ids) | {v for k, v in vocab.special.items() if k in ("eos", "eot", "eom")}):
        lines.append(f'PARAMETER stop "{vocab.tokens[i]}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, vocab) -> Path:
    """`Modelfile` beside the GGUF (modelfile_text), written atomically; returns its path."""
    return write_text_atomic(gguf_path.with_name("Modelfile"), modelfile_text(gguf_path.name, vocab))
