"""The fast-path reasons that `summary.json` records (`fast_path`), pinned for representative runs.

The strings were recorded from the plan before it was split into small deciders
(model/fast/plan.py) and an installer (model/fast/install.py); a restructuring must leave every
one of them as it was, in the same order. Each case goes through `train.setup.pick_collator_and_plan`
(the call training makes) where a real model is involved, so reasons added for what the model
allows (tied embeddings, a biased lm_head, a CPU-resident head) are pinned too.

Device and memory facts are faked: `gpu` is the card's GiB (None: no CUDA), `kernel` the best
packed attention kernel on that torch/GPU, `world` the WORLD_SIZE of a multi-process launch.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fast_helpers import cfg

W512 = dict(data__max_seq_length=512, train__micro_batch_size=8, train__gradient_accumulation=4)
W512_LENS = [300] * 300 + [512] * 84  # ~1 in 5 sequences at the cap
LONG = dict(data__max_seq_length=131072, train__micro_batch_size=1, train__gradient_accumulation=1)
QLORA = dict(model__method="qlora", train__optimizer="paged_adamw_8bit")
FULL = dict(model__method="full", train__optimizer="paged_adamw_8bit")


def _8b(full=False):
    """Llama-3.1-8B-shaped stand-in for the memory estimate: config + parameter bytes, no weights."""
    c = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
    if full:
        params = [torch.nn.Parameter(torch.empty((8_030_000_000,), dtype=torch.bfloat16, device="meta"))]
    else:
        frozen = torch.nn.Parameter(torch.empty((8_030_000_000 // 2,), device="meta"), requires_grad=False)
        params = [frozen, torch.nn.Parameter(torch.empty((42_000_000,), device="meta"))]
    return SimpleNamespace(config=c, parameters=lambda: iter(params))


def _tiny(tied=False, biased_head=False, lora=True):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    m = LlamaForCausalLM(c)
    if biased_head:
        m.lm_head = torch.nn.Linear(64, 300, bias=True)
    m.requires_grad_(not lora)  # full fine-tuning trains every weight (as apply_adapters does)
    if not lora:
        return m
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


# name: (config overrides, model, training example lengths, facts)
CASES = {
    "cpu_lora": (dict(W512), None, W512_LENS, dict(gpu=None)),
    "cpu_packing_on_gc_on": (dict(W512, data__packing="on", train__gradient_checkpointing="on"), None, W512_LENS, dict(gpu=None)),
    "cpu_packing_on_flex": (dict(data__packing="on", fast__attention="flex"), None, None, dict(gpu=None)),
    "cuda_fast_disabled": (dict(W512, fast__enabled=False), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_80": (dict(W512), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_80_short": (dict(W512), "8b", [40] * 400, dict(gpu=80)),
    "w512_lora_40": (dict(W512), "8b", W512_LENS, dict(gpu=40)),
    "w512_lora_budget_16": (dict(W512, fast__memory_gib=16), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_no_lengths": (dict(W512), "8b", None, dict(gpu=80)),
    "w512_lora_flex": (dict(W512), "8b", W512_LENS, dict(gpu=80, kernel="flex")),
    "w512_lora_no_kernel": (dict(W512), "8b", W512_LENS, dict(gpu=80, kernel=None)),
    "w512_lora_sdpa_packing_off": (dict(W512, fast__attention="sdpa", data__packing="off"), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_switches": (dict(W512, train__gradient_checkpointing="on", fast__offload_checkpoints="on",
                                fast__fused_optimizer="off", fast__compile="on", fast__fused_loss="off",
                                fast__single_sequence_sdpa="off", fast__cpu_embeddings="on", fast__regroup_batches="off"),
                           "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_gc_on_regroup": (dict(W512, train__gradient_checkpointing="on"), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_gc_off_varlen_on": (dict(W512, train__gradient_checkpointing="off", fast__attention="varlen",
                                        data__packing="on"), "8b", W512_LENS, dict(gpu=80)),
    "lora_ga1": (dict(data__max_seq_length=512, train__micro_batch_size=16), "8b", W512_LENS, dict(gpu=80)),
    "w512_lora_80_ddp": (dict(W512), "8b", W512_LENS, dict(gpu=80, world=2)),
    "w512_lora_no_model": (dict(W512), None, W512_LENS, dict(gpu=80)),
    "w512_qlora": (dict(W512, **QLORA), "8b", W512_LENS, dict(gpu=80)),
    "w512_qlora_300": (dict(W512, **QLORA), "8b", [300] * 384, dict(gpu=80)),
    "w512_qlora_no_lengths": (dict(W512, **QLORA), "8b", None, dict(gpu=80)),
    "w512_qlora_off": (dict(W512, **QLORA, fast__offload_checkpoints="off", fast__compile="off", fast__cpu_embeddings="off",
                            fast__regroup_batches="off", fast__nf4_kernel="off", fast__cpu_lm_head="off"),
                       "8b", [300] * 384, dict(gpu=80)),
    "w512_qlora_budget_16": (dict(W512, **QLORA, fast__memory_gib=16), "8b", W512_LENS, dict(gpu=80)),
    "w512_qlora_ddp": (dict(W512, **QLORA), "8b", [300] * 384, dict(gpu=80, world=2)),
    "w512_lora_40_ddp": (dict(W512), "8b", W512_LENS, dict(gpu=40, world=2)),
    "w512_full_40": (dict(W512, **FULL, fast__memory_gib=40), "8b_full", W512_LENS, dict(gpu=80)),
    "w512_full_40_adamw8bit": (dict(W512, model__method="full", train__optimizer="adamw_8bit", fast__memory_gib=40),
                               "8b_full", W512_LENS, dict(gpu=80)),
    "w512_full_16": (dict(W512, **FULL, fast__memory_gib=16), "8b_full", W512_LENS, dict(gpu=80)),
    "w512_lora_card_18": (dict(W512), "8b", W512_LENS, dict(gpu=18)),
    "w512_full_46": (dict(W512, **FULL, fast__memory_gib=46), "8b_full", W512_LENS, dict(gpu=80)),
    "w512_full_80_short": (dict(W512, **FULL), "8b_full", [200] * 384, dict(gpu=80)),
    "w512_full_40_partial_off": (dict(W512, **FULL, fast__memory_gib=40, fast__partial_checkpointing="off",
                                      fast__regroup_batches="off"), "8b_full", W512_LENS, dict(gpu=80)),
    "long_qlora_131k": (dict(LONG, **QLORA), "8b", [131072], dict(gpu=80)),
    "long_lora_131k": (dict(LONG), "8b", [131072] * 2, dict(gpu=80)),
    "long_lora_131k_no_tiles": (dict(LONG, fast__tile_mlp="off"), "8b", None, dict(gpu=80)),
    "seq8192_lora_ga2": (dict(data__max_seq_length=8192, train__micro_batch_size=1, train__gradient_accumulation=2),
                         "8b", [8192] * 64, dict(gpu=80)),
    # through pick_collator_and_plan on a real (tiny) model: what the model allows is recorded too
    "tiny_cpu_lora": (dict(W512), "tiny", [20] * 64, dict(gpu=None)),
    "tiny_qlora_head_on_cpu": (dict(W512, **QLORA), "tiny", [20] * 64, dict(gpu=80)),
    "tiny_tied_cpu_embeddings_on": (dict(W512, fast__cpu_embeddings="on", fast__cpu_lm_head="on"), "tiny_tied",
                                    [20] * 64, dict(gpu=80)),
    "tiny_biased_head_full": (dict(W512, **FULL, fast__cpu_lm_head="on"), "tiny_biased_full", [20] * 64, dict(gpu=80)),
}


def fake_facts(monkeypatch, gpu=None, kernel="varlen", world=1):
    """No CUDA (gpu=None), or a CUDA card of `gpu` GiB that every model is placed on."""
    import llamaft.model.fast.plan as plan
    import llamaft.model.fast.attention as att
    import llamaft.model.fast.memory as mem

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(att, "best_packed_attention", lambda: kernel)
    if gpu is not None:
        monkeypatch.setattr(mem, "_card", lambda: (int(gpu * 2**30), int(gpu * 2**30), 0))  # all free
        monkeypatch.setattr(plan, "_cuda_target", lambda model: True)


def reasons_for(name, monkeypatch) -> list[str]:
    over, model, lengths, facts = CASES[name]
    fake_facts(monkeypatch, **facts)
    c = cfg(**over)
    if model in (None, "8b", "8b_full"):
        from llamaft.model.fast import choose_plan

        stand_in = {None: None, "8b": _8b(), "8b_full": _8b(full=True)}[model]
        return list(choose_plan(c, stand_in, lengths).reasons)
    from llamaft.train.setup import pick_collator_and_plan

    m = {"tiny": _tiny(), "tiny_tied": _tiny(tied=True), "tiny_biased_full": _tiny(biased_head=True, lora=False)}[model]
    _, _, plan = pick_collator_and_plan(c, m, 0, lengths)
    return list(plan.reasons)


# Recorded from the plan as it was before the split (one run of `reasons_for` per case); never
# regenerate this file to make the test pass: a changed reason is a changed summary.json. Regenerated
# on purpose once since, with every diff read (issue 16: the budget became device-level, counted the
# 8-bit states, and gained the memory-lean lora plan and the optimizer in the backward; then the
# micro-batch shape under partial checkpointing became the cheapest estimated step, w512_lora_40; then
# packing's line became "no pad tokens between examples": fast.pack_multiple, opt-in, may end a row
# with a pad segment).
REASONS = json.loads((Path(__file__).parent / "plan_reasons.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(CASES))
def test_reasons_unchanged(name, monkeypatch):
    assert reasons_for(name, monkeypatch) == REASONS[name]


def test_every_case_is_pinned():
    assert sorted(REASONS) == sorted(CASES)
