"""Adapters and base loading on a tiny random Llama: LoRA variants, full, added pad token, precision."""

import pytest
import torch

from llamaft.config import LoraConfig, ModelConfig, TrainConfig
from llamaft.errors import LlamaftError
from llamaft.model.adapters import apply_adapters, save_trained
from llamaft.model.load import load_base, resolve_precision
from train_helpers import Rules, tiny_model_dir, tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def _base(model_dir, tok=None, method="lora", added=()):
    tok = tok or tokenizer()
    mc = ModelConfig(name=str(model_dir), method=method)
    return load_base(mc, None, Rules(pad_id=tok.pad_token_id, added_tokens=list(added)), tok, torch.float32), mc


def test_load_base_sets_pad_stops_and_no_cache(model_dir):
    model, _ = _base(model_dir)
    assert model.config.pad_token_id == 0 and model.config.use_cache is False
    assert model.generation_config.eos_token_id == [1, 3]
    assert model.get_input_embeddings().weight.shape[0] == 64  # no resize needed


def test_missing_model_is_one_line_error(tmp_path):
    mc = ModelConfig(name=str(tmp_path / "nope"))
    with pytest.raises(LlamaftError, match="cannot load model"):
        load_base(mc, None, Rules(), tokenizer(), torch.float32)


def test_tokenizer_larger_than_the_embeddings_is_an_error_unless_tokens_were_added(model_dir):
    tok = tokenizer(extra_pad=True)  # 65 ids on 64 rows, and the rules did not add <|pad|>
    with pytest.raises(LlamaftError, match="the tokenizer has 65 ids but the model has 64 embedding rows; set model.tokenizer"):
        _base(model_dir, tok)


def test_lora_all_linear_rslora_dora(model_dir):
    model, mc = _base(model_dir)
    peft = apply_adapters(model, mc, LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True))
    cfg = peft.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and cfg.r == 4
    wrapped = {name.rsplit(".", 1)[-1] for name in cfg.target_modules}  # all-linear → every projection
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA magnitude
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    out = peft(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    out.loss.backward()  # constructs and trains


def test_unknown_target_module_is_clear_error(model_dir):
    model, mc = _base(model_dir)
    with pytest.raises(LlamaftError, match="lora.target_modules"):
        apply_adapters(model, mc, LoraConfig(target_modules=["nonexistent_proj"]))


def test_full_makes_everything_trainable(model_dir):
    model, mc = _base(model_dir, method="full")
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_adapters(model, mc, LoraConfig())
    assert all(p.requires_grad for p in model.parameters())


def test_added_pad_token_resizes_trains_and_saves_embeddings(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = tokenizer(extra_pad=True)
    assert len(tok) == 65 and tok.pad_token_id == 64
    model, mc = _base(model_dir, tok, added=["<|pad|>"])  # as model.add_pad_token makes the tokenizer rules say
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 65 and model.config.pad_token_id == 64
    assert torch.allclose(emb[64], emb[:64].mean(0))  # deterministic new row
    peft = apply_adapters(model, mc, LoraConfig(r=4))
    assert peft.peft_config["default"].trainable_token_indices
    # one optimizer step so the new rows and the adapter differ from their init
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[5, 6, 64, 7]])
    peft(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_trained(peft, tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(65, mean_resizing=False)  # rows come from the adapter, not from here
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    peft.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)


def test_stack_loads_an_adapter_frozen_and_without_dropout_under_a_new_one(model_dir, tmp_path, capsys):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from llamaft.model.adapters import FROZEN, frozen_only

    dropping = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"])
    sft = get_peft_model(_base(model_dir)[0], dropping)
    sft.save_pretrained(tmp_path / "sft")
    model, mc = _base(model_dir)
    model = apply_adapters(model, mc, LoraConfig(r=2, dropout=0.5), frozen=tmp_path / "sft")
    assert "lora: a new adapter (r=2, alpha=16) on the frozen adapter" in capsys.readouterr().out
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout["default"], torch.nn.Dropout)
    assert isinstance(q.lora_dropout[FROZEN], torch.nn.Identity)  # its function fixed, also while the new one trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable) and model.active_adapters == ["default", FROZEN]
    with frozen_only(model):
        assert model.active_adapters == [FROZEN]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapters == ["default", FROZEN]
    model, mc = _base(model_dir, tokenizer(extra_pad=True), added=["<|pad|>"])  # trainable token rows: PEFT stacks none
    with pytest.raises(LlamaftError, match="^model.from_run: stack: added tokens .* use model.from_run merge or continue$"):
        apply_adapters(model, mc, LoraConfig(r=2), frozen=tmp_path / "sft")


def test_precision_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU rules")
    assert resolve_precision(TrainConfig(), ModelConfig(name="x")) == (torch.float32, False, False)
    assert resolve_precision(TrainConfig(precision="bf16"), ModelConfig(name="x")) == (torch.bfloat16, True, False)
    assert resolve_precision(TrainConfig(), ModelConfig(name="x", dtype="bfloat16"))[0] == torch.bfloat16
    with pytest.raises(LlamaftError, match="fp16 needs a CUDA GPU"):
        resolve_precision(TrainConfig(precision="fp16"), ModelConfig(name="x"))
