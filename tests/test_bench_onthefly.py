"""benchmarks/onthefly.py: a 70B-shaped random model built layer by layer, checked on CPU on a tiny shape."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _tiny_llama():
    import onthefly

    return onthefly.llama_config("llama-3.1-70b", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)


def test_the_on_the_fly_build_is_the_normal_architecture(one_thread):
    import torch
    from transformers import LlamaForCausalLM

    import onthefly

    cfg = _tiny_llama()
    built = onthefly.build(cfg, "lora", "cpu", dtype=torch.float32)
    normal = LlamaForCausalLM(_tiny_llama())
    assert [(n, type(m)) for n, m in built.named_modules()] == [(n, type(m)) for n, m in normal.named_modules()]
    assert {n: (p.shape, p.dtype, p.device.type) for n, p in built.named_parameters()} == \
        {n: (p.shape, p.dtype, p.device.type) for n, p in normal.named_parameters()}
    for (name, a), (_, b) in zip(built.named_buffers(), normal.named_buffers()):  # the rotary table (llama3 scaling)
        torch.testing.assert_close(a, b, msg=name)
    assert all(float(p.std()) > 0.01 for n, p in built.named_parameters() if "norm" not in n)  # random, not empty
    assert all(bool((p == 1).all()) for n, p in built.named_parameters() if "norm" in n)
    ids = torch.randint(0, 96, (2, 9))
    assert torch.isfinite(built(input_ids=ids).logits).all()
    assert onthefly.llama_config("llama-3.1-70b").num_hidden_layers == 80


def test_each_layer_is_quantized_before_the_next_exists(one_thread):
    """The bf16 peak is one layer: when layer i is quantized, every later layer is still on the meta device."""
    import torch

    import onthefly

    seen = []

    def quantize(model, i):
        later = {p.device.type for layer in list(model.model.layers)[i + 1:] for p in layer.parameters()}
        seen.append((i, model.model.layers[i].self_attn.q_proj.weight.device.type, later))

    model = onthefly.build(_tiny_llama(), "qlora", "cpu", dtype=torch.float32, quantize=quantize)
    assert seen == [(0, "cpu", {"meta"}), (1, "cpu", {"meta"}), (2, "cpu", set())]
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4" and model.is_loaded_in_4bit
    # the Trainer's own check accepts it for LoRA training, as a from_pretrained QLoRA model
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import validate_quantization_for_training

    assert model.hf_quantizer.is_trainable and model.is_quantized
    validate_quantization_for_training(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
