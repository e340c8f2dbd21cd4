"""Exported GGUFs loaded in llama.cpp (llama-cpp-python): tokenization parity, greedy equality with
transformers (f16), top-1 agreement (q8_0), stop tokens, and the GGUF chat backend.

Skipped with a visible reason when llama-cpp-python is not installed
(build it once: scripts/build_llama_cpp_wheel.sh)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: run scripts/build_llama_cpp_wheel.sh")

from gguf_helpers import make_model_dir  # noqa: E402

from llamaft.assets import gguf_reader  # noqa: E402 - gguf's own reader over a plain ndarray view (faster)
from llamaft.model.generate import GenParams  # noqa: E402
from llamaft.chat.gguf_backend import load_gguf, prompt_tokens, stream_chat_gguf  # noqa: E402
from llamaft.export.gguf import export_gguf  # noqa: E402
from llamaft.export.gguf_check import check_gguf  # noqa: E402

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name three colours, 1 2 3!"}]]


# std 0.3: a random tiny model with peaked logits, so greedy decoding is not a coin toss between ties
@pytest.fixture(scope="module", params=["llama31", "smollm2"])
def model_dir(request, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp(request.param) / "merged", request.param, std=0.3)


def test_f16_greedy_equal_and_tokenizer_parity(model_dir, tmp_path):
    out = export_gguf(model_dir, tmp_path / "m.f16.gguf", "f16")
    r = check_gguf(out, model_dir, CHATS + ["The llama"], n_tokens=32)
    print(r.verdict())
    assert not r.tokenization_mismatches, r.tokenization_mismatches
    assert r.tokenization_total >= 10
    assert not r.not_eog  # every generation_config stop id ends generation in llama.cpp
    assert all(len(p.gguf_tokens) == 32 or p.gguf_tokens[-1] in r.stop_ids for p in r.prompts)
    # A random model spreads its logits over 49k/128k ids, so near-ties exist; llama.cpp rounds
    # activations to f16 in its matmuls, which may flip one. Every flip must be such a tie, and rare.
    assert r.real_flips == 0, [(p.gguf_tokens, p.hf_top1, p.margins) for p in r.prompts]
    assert r.top1_agreement >= 0.95 and r.max_logit_diff < 0.2
    assert r.passed


def test_q8_0_top1_agreement(model_dir, tmp_path):
    out = export_gguf(model_dir, tmp_path / "m.q8_0.gguf", "q8_0")
    r = check_gguf(out, model_dir, CHATS, n_tokens=32)
    print(r.verdict())
    assert r.file_type == "Q8_0" and not r.tokenization_mismatches
    # random weights amplify quantisation noise through the layers (real SmolLM2: see the slow test)
    assert r.top1_agreement >= 0.7


def test_chat_backend_renders_like_transformers(model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = export_gguf(model_dir, tmp_path / "m.f16.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    h = load_gguf(out, n_ctx=512)
    for msgs in CHATS:
        hf = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        hf = list(hf["input_ids"] if hasattr(hf, "keys") else hf)
        assert prompt_tokens(h, msgs) == hf  # one BOS, specials as single ids
    text = "".join(stream_chat_gguf(h, CHATS[0], GenParams(temperature=0, max_new_tokens=8)))
    assert isinstance(text, str) and "<|" not in text


@pytest.mark.slow
def test_real_smollm2_f16_matches_and_stops(tmp_path):
    """The embedded SmolLM2-135M-Instruct (dequantised to HF), exported to f16: greedy answers equal
    transformers token for token and end on <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamaft.assets import smollm2_gguf
    from gguf_helpers import smollm2_tokenizer_dir
    from llamaft.model.tokenizer import make_rules, save_tokenizer
    from transformers import AutoTokenizer

    src = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    d = tmp_path / "merged"
    d.mkdir()
    # save_pretrained refuses GGUF-loaded models: write the (dequantised) weights and config ourselves
    from safetensors.torch import save_file
    import json

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    tok.eos_token = "<|im_end|>"
    save_tokenizer(tok, make_rules(tok, "other", True, tok.chat_template), d)
    prompts = [[{"role": "user", "content": "What is 2+2?"}],
               [{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Give me one tip for writing clean Python code."}]]
    out = export_gguf(d, tmp_path / "smol.f16.gguf", "f16")
    r = check_gguf(out, d, prompts, n_tokens=64, hf_model=model, tokenizer=tok)
    print(r.verdict())
    assert r.passed and r.greedy_equal and r.stopped >= 2 and not r.stop_disagree
    q8 = check_gguf(export_gguf(d, tmp_path / "smol.q8_0.gguf", "q8_0"), d, prompts, n_tokens=64, hf_model=model, tokenizer=tok)
    print(q8.verdict())
    assert q8.passed and q8.top1_agreement >= 0.9


def test_q4_k_m_through_llama_cpp(tmp_path):
    """k-quants come from llama.cpp's own quantizer (binary on PATH, else the binding)."""
    import gguf

    d = make_model_dir(tmp_path / "merged", "smollm2", std=0.3)
    out = export_gguf(d, tmp_path / "m.q4_k_m.gguf", "q4_k_m")
    r = gguf_reader(str(out))
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    # 64-wide rows are not whole 256-blocks, so llama.cpp picks its fallbacks (q5_0, q8_0, ...), never f16
    types = {t.tensor_type.name for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert types and not types & {"F16", "F32", "BF16"}, types
    assert not list(tmp_path.glob(".*tmp"))
