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


def _bench_model(monkeypatch, rank: int):
    """bench.load_model for `random:tiny lora --strategy fsdp` as process `rank` of 2 under torchrun."""
    import bench

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    args = bench.parse_args(["random:tiny", "lora", "64", "2", "1", "2", "unused.json", "--strategy", "fsdp"])
    return bench.load_model(args), args


def test_fsdp_rank_0_builds_the_model_in_cpu_memory_and_the_others_on_meta(monkeypatch, one_thread):
    """What accelerate's cpu_ram_efficient_loading needs: rank 0's state dict has every tensor the other ranks'
    models name, with the same shape and dtype; only rank 0 holds the weights; the rotary table (not in a
    state dict: every rank keeps its own) is real everywhere; the meta ranks' LoRA weights have storage of
    their own (accelerate maps the optimizer to the shards by data_ptr, 0 for every meta tensor)."""
    import torch

    import bench

    real, args = _bench_model(monkeypatch, 0)
    meta, _ = _bench_model(monkeypatch, 1)
    shapes = {k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
    assert any("lora_A" in k for k in shapes) and any("lora_B" in k for k in shapes)
    assert {p.device.type for p in real.parameters()} == {"cpu"}
    assert all(float(p.float().std()) > 0.01 for n, p in real.named_parameters() if "layers.1.mlp" in n and "lora" not in n)
    trainable = [p for p in meta.parameters() if p.requires_grad]
    assert {p.device.type for p in meta.parameters() if not p.requires_grad} == {"meta"}
    assert {p.device.type for p in trainable} == {"cpu"} and len({p.data_ptr() for p in trainable}) == len(trainable)
    for (name, a), (_, b) in zip(real.named_buffers(), meta.named_buffers()):
        assert a.device.type == b.device.type == "cpu"
        torch.testing.assert_close(a, b, msg=name)
    # the FSDP fields: llamaft.train's, plus rank 0 as the only source of weights
    fsdp_config = bench.fsdp_arguments(args, bench.run_config(args))["fsdp_config"]
    assert fsdp_config["version"] == 2 and fsdp_config["cpu_ram_efficient_loading"] is True


def test_cpu_random_fill_is_threaded_and_the_same_on_any_thread_count(monkeypatch):
    import torch

    import onthefly

    monkeypatch.setattr(onthefly, "CHUNK", 1000)
    fills = []
    for threads in (1, 3):
        tensors = [torch.empty(2500), torch.empty(40, 50, dtype=torch.bfloat16)]
        onthefly._normal_threaded(tensors, 0.02, torch.Generator().manual_seed(7), threads=threads)
        fills.append(tensors)
    for a, b in zip(*fills):
        assert torch.equal(a, b)
    flat = fills[0][0]
    assert abs(float(flat.std()) - 0.02) < 0.002 and not torch.equal(flat[:1000], flat[1000:2000])  # a stream a chunk
