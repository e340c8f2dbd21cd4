"""DPO's CUDA plan end to end (run on the device: pytest -m gpu tests/train/test_preference_gpu.py): packed
pairs, fused LoRA, our layer checkpointing and torch.compile, in bf16. At step 1 the new adapter's B is
zero, so policy and reference are the same model and the loss must be exactly ln 2 on this small model
(also at the 8B's width, checked once on the H200; the 32-layer 8B benchmark gives 0.6886, see
plan_preference.preference_compile): a policy forward compiled with grad would round apart here."""

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model_dir(root):
    """A random 2-layer Llama with head_dim 64 (flash attention's shapes) over the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_helpers import VOCAB, chat_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    out = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    chat_tokenizer().save_pretrained(out)
    return out


def _first_loss_and_plan(root, name, train_over=None, **fast):
    from llamaft.train.recipe import train
    from preference_helpers import preference_config

    cfg = preference_config(root / "tiny-llama", root / name, max_steps=2, eval_every=0, save_every=0,
                            gradient_checkpointing=fast.pop("gc", "on"), **(train_over or {}))
    cfg = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"enabled": True, **fast}),
                                 "lora": cfg.lora.model_copy(update={"dropout": 0.0})})
    out = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r][0], json.loads((out / "summary.json").read_text())["fast_path"]


def test_compiled_checkpointed_dpo_starts_at_exactly_ln2(tmp_path):
    from preference_helpers import preference_project

    preference_project(tmp_path)
    _model_dir(tmp_path)  # over preference_project's head_dim-8 model
    loss, plan = _first_loss_and_plan(tmp_path, "own")
    assert any(line.startswith("checkpoints: ours, every layer") for line in plan), plan
    assert any(line.startswith("torch.compile on (auto: with our checkpointing") for line in plan), plan
    assert any("fused LoRA linears on" in line for line in plan), plan
    eager, _ = _first_loss_and_plan(tmp_path, "eager", compile="off")
    print(f"step-1 loss: compiled + our checkpointing {loss!r}, eager {eager!r}, ln 2 {math.log(2)!r}")
    assert loss == pytest.approx(math.log(2), abs=1e-6) and eager == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_qlora_and_full_dpo_train_on_the_cuda_plan(tmp_path, method):
    """The same plan for QLoRA (NF4 kernel; the reference's adapter-off forward is bitsandbytes') and
    full fine-tuning (a frozen reference copy, not compiled): trains, finite losses near ln 2 at step 1."""
    pytest.importorskip("bitsandbytes")
    from preference_helpers import preference_project

    preference_project(tmp_path)
    _model_dir(tmp_path)
    loss, plan = _first_loss_and_plan(tmp_path, method, {"method": method, "learning_rate": 1e-4})
    assert any(line.startswith("checkpoints: ours, every layer") for line in plan), plan
    assert any(line.startswith("torch.compile on (auto") for line in plan), plan
    print(f"{method} step-1 loss {loss!r}")
    assert math.isfinite(loss) and abs(loss - math.log(2)) < 0.05
