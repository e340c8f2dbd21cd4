"""Merge / export / load_for_inference on tiny random Llama models (CPU, seconds).

Tolerance for "same logits": fp32 throughout, atol 1e-4 on logits of magnitude ~5-10 (observed
max difference ~1e-5: W + BA summed once vs. x·W + x·A·B in two matmuls).
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from inference_helpers import make_run_dir, save_model_dir, tiny_model, tiny_rules, tiny_tokenizer
from llamaft.errors import LlamaftError
from llamaft.export.hf import export_hf
from llamaft.export.merge import merge
from llamaft.model.inference import load_for_inference, resolve_source

ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    return merge(run, tmp_path_factory.mktemp("out") / "merged", dtype="float32")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[256, 258, 84, 82, 68, 81, 259, 198, 71, 105, 260, 258, 64, 259], [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10]])


def test_merged_logits_equal_base_plus_adapter(run, merged):
    peft_model, _, _ = load_for_inference(run, device="cpu")
    base, _, _ = load_for_inference(run, adapter=False, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(str(merged))  # no llamaft, no peft
    ref, got = _logits(peft_model, IDS), _logits(plain, IDS)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # The adapter really changes the model (non-zero B), so equality above is not vacuous.
    assert (_logits(base, IDS) - ref).abs().max() > 0.5
    assert type(peft_model).__name__.startswith("PeftModel") and type(base).__name__ == "LlamaForCausalLM"


def test_merged_dir_contents(merged):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not any(n.startswith(".") for n in merged.parent.iterdir() for n in [n.name])  # no temp dirs left
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [257, 260] and gen["pad_token_id"] == 261
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())


def test_model_dir_loading_matches_run_rules(run, merged):
    _, _, run_rules = load_for_inference(run, device="cpu")
    model, tok, rules = load_for_inference(merged, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert rules.stop_ids == run_rules.stop_ids == [257, 260]
    assert rules.pad_id == run_rules.pad_id == tok.pad_token_id == 261
    assert rules.instruct and rules.chat_template == tok.chat_template
    assert resolve_source(merged).kind == "model" and resolve_source(run).kind == "adapter"
    assert resolve_source(run / "adapter").run_dir == run


def test_merge_bf16_and_overwrite_rules(run, merged, tmp_path):
    with pytest.raises(LlamaftError, match="not empty"):
        merge(run, merged)
    with pytest.raises(LlamaftError, match="overwrite the input"):
        merge(run, run, overwrite=True)
    with pytest.raises(LlamaftError, match="no adapter to merge"):
        merge(merged, tmp_path / "x")
    with pytest.raises(LlamaftError, match="dtype"):
        merge(run, tmp_path / "x", dtype="int8")
    out = tmp_path / "bf16"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge(run, out, dtype="bfloat16", overwrite=True)
    assert not (out / "stale.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_resized_embeddings_travel_with_adapter(tmp_path):
    """Training added <|pad|> (no spare special token): embeddings grew 261 -> 262 and the new rows
    trained; the merge must rebuild that size and those rows."""
    run = make_run_dir(tmp_path, add_pad=True)
    peft_model, tok, rules = load_for_inference(run, device="cpu")
    assert len(tok) == 262 and rules.pad_id == 261 and 261 not in rules.stop_ids
    out = merge(run, tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert plain.get_input_embeddings().weight.shape[0] == 262
    ids = torch.cat([IDS, torch.full((2, 1), 261)], dim=1)  # the new token too
    torch.testing.assert_close(_logits(plain, ids), _logits(peft_model, ids), atol=ATOL, rtol=0)


def test_full_run_and_export_hf_sharded(tmp_path):
    run = make_run_dir(tmp_path, method="full")
    model, _, _ = load_for_inference(run, device="cpu")
    out = export_hf(run, tmp_path / "hf", dtype="float32", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(_logits(plain, IDS), _logits(model, IDS), atol=1e-6, rtol=0)
    # A model dir re-exports (fp16 here) with the stop ids kept.
    out16 = export_hf(out, tmp_path / "hf16", dtype="float16")
    assert json.loads((out16 / "generation_config.json").read_text())["eos_token_id"] == [257, 260]
    with pytest.raises(LlamaftError, match="max shard size"):
        export_hf(out, tmp_path / "y", max_shard_size="lots")


def test_load_errors(tmp_path):
    with pytest.raises(LlamaftError, match="no such file"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(LlamaftError, match="not a run directory"):
        load_for_inference(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {name: x}\n")
    with pytest.raises(LlamaftError, match="neither adapter/ nor model/"):
        load_for_inference(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(LlamaftError, match="got a file"):
        load_for_inference(f)


def test_llama31_merge_lists_all_three_stop_ids(tmp_path, llama3_tokenizer, tiny_llama31_model):
    """The real Llama 3.1 tokenizer (128,256 ids): merged generation_config stops on 128001, 128008, 128009."""
    run = make_run_dir(tmp_path, tok=llama3_tokenizer, base=tiny_llama31_model, model_extra={"instruct": True})
    out = merge(run, tmp_path / "merged", dtype="bfloat16")
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [128001, 128008, 128009] and gen["pad_token_id"] == 128004
    _, tok, rules = load_for_inference(out, device="cpu")
    assert rules.family == "llama3.1" and rules.stop_ids == [128001, 128008, 128009] and rules.pad_id == 128004
    assert "<|start_header_id|>" in tok.chat_template


def test_save_model_dir_helper_roundtrip(tmp_path):
    tok = tiny_tokenizer()
    d = save_model_dir(tiny_model(), tok, tiny_rules(tok), tmp_path / "m")
    _, _, rules = load_for_inference(d, device="cpu")
    assert rules.stop_ids == [257, 260] and rules.pad_id == 261


def test_qlora_run_loads_unquantized_on_cpu(tmp_path):
    """qlora needs CUDA to train, but its run merges/chats anywhere: the base loads in 16-bit."""
    run = make_run_dir(tmp_path, method="qlora", model_extra={"dtype": "auto"})
    model, _, _ = load_for_inference(run, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16  # auto on CPU: 16-bit for qlora runs
    out = merge(run, tmp_path / "merged", dtype="bfloat16")
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert not hasattr(plain.config, "quantization_config") or plain.config.quantization_config is None
    # bf16 weights: compare at bf16 precision (the rounding of W + BA vs x·W + x·A·B differs).
    ref, got = _logits(model, IDS), _logits(plain, IDS)
    assert (got - ref).abs().max() < 0.15 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
