"""The embedded model's one-time preparation: our one-read GGUF conversion against transformers' loader
(parity), the q/k un-permutation against llama.cpp's permutation, and the cache's announce/stage/publish."""

import json

import numpy as np
import pytest

from llamaft import assets
from llamaft.errors import LlamaftError


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: what the GGUF holds for q/k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpps_permutation_for_q_and_grouped_k():
    class Config:
        num_attention_heads, num_key_value_heads = 4, 2

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((32, 8)), rng.standard_normal((16, 8))
    assert np.array_equal(assets._unpermute(_llama_cpp_permute(q, 4), "blk.0.attn_q.weight", Config), q)
    assert np.array_equal(assets._unpermute(_llama_cpp_permute(k, 2), "blk.0.attn_k.weight", Config), k)
    v = rng.standard_normal((16, 8))
    assert assets._unpermute(v, "blk.0.attn_v.weight", Config) is v


def test_an_unknown_tensor_name_is_an_error_not_a_silently_dropped_weight():
    names = dict(assets._hf_names(2, {"blk.1.ffn_up.weight": 0, "token_embd.weight": 0}))
    assert names == {"blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj.weight", "token_embd.weight": "model.embed_tokens.weight"}
    with pytest.raises(LlamaftError, match="blk.0.attn_qkv.weight: not part of a llama model"):
        dict(assets._hf_names(2, {"blk.0.attn_qkv.weight": 0}))


def test_preparation_is_announced_staged_and_published_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "m.gguf")
    calls = []

    def fake(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("x")

    target = assets.prepare_smollm2(convert=fake)
    assert target == tmp_path / assets.DEMO_MODEL_DIRNAME and assets.smollm2_prepared()
    assert "preparing the embedded model once: converting m.gguf" in capsys.readouterr().err
    assert calls[0] != target  # written to a staging directory, then renamed into place
    assert assets.prepare_smollm2(convert=fake) == target and len(calls) == 1  # cached: no second conversion


def test_a_failed_preparation_publishes_nothing_and_the_next_one_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "m.gguf")

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        assets.prepare_smollm2(convert=broken)
    assert not assets.smollm2_prepared() and not (tmp_path / assets.DEMO_MODEL_DIRNAME).exists()

    def fine(gguf, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("x")

    assets.prepare_smollm2(convert=fine)  # the killed run's staging is removed, the cache published
    assert [p.name for p in tmp_path.iterdir()] == [assets.DEMO_MODEL_DIRNAME]


@pytest.mark.slow
def test_one_read_conversion_equals_transformers_gguf_loader(tmp_path):
    """Parity with the reference: identical weights and config, the same tokenizer, the same logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.smollm2_gguf()
    fast, ref = tmp_path / "fast", tmp_path / "ref"
    fast.mkdir(), ref.mkdir()
    assets.convert_llama_gguf(gguf, fast)
    assets.convert_llama_gguf_reference(gguf, ref)
    a, b = load_file(fast / "model.safetensors"), load_file(ref / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (fast, ref))
    ignored = {"_model_name_or_path", "transformers_version"}
    assert {k: v for k, v in ca.items() if k not in ignored} == {k: v for k, v in cb.items() if k not in ignored}
    assert (fast / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(fast)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (fast, ref))
    assert torch.equal(la, lb)


def test_gguf_reader_parses_exactly_what_gguf_parses(tmp_path):
    """The plain-view reader is gguf's own parser over the same bytes: every field and tensor equal."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([float(i) for i in range(300)])
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    plain, fast = gguf.GGUFReader(str(path)), assets.gguf_reader(str(path))
    assert not isinstance(fast.data, np.memmap) and isinstance(plain.data, np.memmap)
    assert list(fast.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        assert fast.fields[name].contents() == field.contents(), name
    assert fast.fields["tokenizer.ggml.tokens"].contents()[299] == "tok299"
    assert [(t.name, t.data.tolist()) for t in fast.tensors] == [(t.name, t.data.tolist()) for t in plain.tensors]
