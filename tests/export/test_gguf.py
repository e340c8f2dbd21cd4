"""GGUF export read back with gguf.GGUFReader: metadata, tokenizer, tensors (q/k un-permuted = HF),
quantised types dequantised close to the originals, Modelfile, errors. No llama.cpp needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from llamaft.assets import gguf_reader  # noqa: E402 - gguf's own reader over a plain ndarray view (faster)
from llamaft.errors import LlamaftError  # noqa: E402
from llamaft.export.gguf import export_gguf, llama3_rope_factors, permute_qk, unpermute_qk  # noqa: E402

from gguf_helpers import LLAMA31_ROPE, make_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama31") / "merged", "llama31")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("smol") / "merged", "smollm2")


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def tensors(reader) -> dict[str, tuple[np.ndarray, str]]:
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]), t.tensor_type.name)
    return out


def test_permute_roundtrip():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_qk(w, 8)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_qk(p, 8), w)
    # rows of one head: HF [x0..x7 | y0..y7] (rotate-half) -> llama.cpp [x0 y0 x1 y1 ...] (pairs)
    assert list(p[:4, 0] // 3) == [0, 8, 1, 9]


def test_llama31_f16_roundtrip(llama31_dir, tmp_path):
    out = export_gguf(llama31_dir, tmp_path / "m.gguf", "f16", ollama=True)
    assert out == tmp_path / "m.gguf" and not list(tmp_path.glob(".*tmp"))
    r = gguf_reader(str(out))
    f = fields(r)
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.context_length"] == 131072
    assert f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 128
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.freq_base"] == 500000.0 and f["llama.rope.dimension_count"] == 16
    assert abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert f["llama.vocab_size"] == 128256 and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # tokenizer as llama.cpp expects for Llama 3
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(toks) == 128256 and toks[128009] == "<|eot_id|>" and toks[1] == '"'
    assert types[128000] == types[128009] == types[128255] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.CONTROL for t in types) == 256 and types[1000] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) == 280147
    assert f["tokenizer.ggml.merges"][0] == "Ġ Ġ"
    assert f["tokenizer.ggml.bos_token_id"] == 128000 and f["tokenizer.ggml.eos_token_id"] == 128009
    assert f["tokenizer.ggml.eot_token_id"] == 128009 and f["tokenizer.ggml.eom_token_id"] == 128008
    assert f["tokenizer.ggml.padding_token_id"] == 128004
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert "Cutting Knowledge Date" in f["tokenizer.chat_template"]
    # tensors: q/k un-permuted equal the HF weights (f16 rounding only), norms F32, rope_freqs
    hf, got = hf_state(llama31_dir), tensors(r)
    assert len(got) == 4 + 2 * 9  # rope_freqs, token_embd, output_norm, output + 9 per block
    q, qt = got["blk.1.attn_q.weight"]
    k, _ = got["blk.1.attn_k.weight"]
    assert qt == "F16" and q.shape == (64, 64) and k.shape == (32, 64)
    np.testing.assert_allclose(unpermute_qk(q, 4), hf["model.layers.1.self_attn.q_proj.weight"], atol=1e-3)
    np.testing.assert_allclose(unpermute_qk(k, 2), hf["model.layers.1.self_attn.k_proj.weight"], atol=1e-3)
    assert not np.allclose(k, hf["model.layers.1.self_attn.k_proj.weight"], atol=1e-3)  # really permuted
    for g, h in [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                 ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
                 ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"),
                 ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                 ("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")]:
        np.testing.assert_allclose(got[g][0], hf[h], atol=1e-3, err_msg=g)
    for g, h in [("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                 ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
                 ("output_norm.weight", "model.norm.weight")]:
        assert got[g][1] == "F32"
        np.testing.assert_array_equal(got[g][0], hf[h])
    rf, rft = got["rope_freqs.weight"]
    assert rft == "F32" and rf.shape == (8,)
    assert rf[0] == 1.0 and rf[-1] == 8.0  # high frequencies untouched, lowest scaled by `factor`
    np.testing.assert_array_equal(rf, llama3_rope_factors({"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}}))
    mf = (tmp_path / "Modelfile").read_text()
    assert mf.startswith("FROM ./m.gguf") and "Cutting Knowledge Date" in mf
    for stop in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"):
        assert f'PARAMETER stop "{stop}"' in mf


def test_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                      max_position_embeddings=131072)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    ours = llama3_rope_factors(cfg.to_dict())
    # llama.cpp divides each base frequency by its factor: must give transformers' scaled inv_freq
    np.testing.assert_allclose(base.numpy() / ours, inv.numpy(), rtol=1e-5)


def test_smollm2_q8_0_roundtrip(smol_dir, tmp_path):
    out = export_gguf(smol_dir, tmp_path, "q8_0", ollama=True)  # a directory: name chosen for us
    assert out == tmp_path / "merged.q8_0.gguf"
    r = gguf_reader(str(out))
    f = fields(r)
    assert f["tokenizer.ggml.pre"] == "smollm" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["llama.rope.freq_base"] == 100000.0 and f["llama.vocab_size"] == 49152
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert toks[2] == "<|im_end|>" and types[2] == gguf.TokenType.CONTROL and sum(t == 3 for t in types) == 17
    assert f["tokenizer.ggml.eos_token_id"] == 2 and f["tokenizer.ggml.eot_token_id"] == 2
    assert f["tokenizer.ggml.add_bos_token"] is False  # SmolLM2 text starts without BOS
    assert f["tokenizer.ggml.padding_token_id"] not in (2,)
    assert len(f["tokenizer.ggml.merges"]) == 48900
    got, hf = tensors(r), hf_state(smol_dir)
    assert "output.weight" not in got and "rope_freqs.weight" not in got  # tied head, no rope scaling
    for g, h in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                 ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
                 ("token_embd.weight", "model.embed_tokens.weight")]:
        data, qt = got[g]
        assert qt == "Q8_0"
        data = unpermute_qk(data, 4) if "attn_q" in g else data
        err = np.abs(data - hf[h]).max() / np.abs(hf[h]).max()
        assert err < 1 / 127 + 1e-3, (g, err)  # one int8 step of the block scale at most
    mf = (tmp_path / "Modelfile").read_text()
    assert "<|im_start|>assistant" in mf and 'PARAMETER stop "<|im_end|>"' in mf


def test_q4_0_keeps_output_wider(smol_dir, tmp_path):
    out = export_gguf(smol_dir, tmp_path / "m.gguf", "q4_0")
    got, hf = tensors(gguf_reader(str(out))), hf_state(smol_dir)
    # tied: token_embd is also the output matrix, so it stays 8-bit
    assert got["blk.0.ffn_up.weight"][1] == "Q4_0" and got["token_embd.weight"][1] == "Q8_0"
    w, ref = got["blk.0.ffn_up.weight"][0], hf["model.layers.0.mlp.up_proj.weight"]
    rel = np.linalg.norm(w - ref) / np.linalg.norm(ref)
    assert 0.01 < rel < 0.15  # really 4-bit, but close
    assert got["blk.0.attn_norm.weight"][1] == "F32"


def test_bf16_and_errors(smol_dir, tmp_path):
    out = export_gguf(smol_dir, tmp_path / "m.gguf", "bf16")
    got, hf = tensors(gguf_reader(str(out))), hf_state(smol_dir)
    assert got["blk.0.attn_v.weight"][1] == "BF16"
    np.testing.assert_allclose(got["blk.0.attn_v.weight"][0], hf["model.layers.0.self_attn.v_proj.weight"], rtol=1e-2, atol=1e-4)
    with pytest.raises(LlamaftError, match="unknown GGUF outtype"):
        export_gguf(smol_dir, tmp_path / "x.gguf", "q3_x")
    with pytest.raises(LlamaftError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    cfg = json.loads((smol_dir / "config.json").read_text())
    bad = tmp_path / "mistral"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(LlamaftError, match="Llama-architecture"):
        export_gguf(bad, tmp_path / "x.gguf")


def test_kquant_without_llama_cpp_is_a_clear_error(smol_dir, tmp_path, monkeypatch):
    import builtins

    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "llama_cpp" else real_import(name, *a, **k))
    with pytest.raises(LlamaftError, match="llama-quantize"):
        export_gguf(smol_dir, tmp_path / "m.gguf", "q4_k_m")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
