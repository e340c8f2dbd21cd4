"""model.fast.plan_preference: which DPO runs pack their pairs, with which attention, and why."""

import pytest
import torch

from fast_helpers import cfg
from llamaft.model.fast.plan import Facts
from llamaft.model.fast.plan_preference import preference_packing, preference_plan

CUDA = Facts(cuda=True, packed_kernel="varlen")
CPU = Facts(cuda=False)


def dpo(**over):
    return cfg(train__objective="dpo", **over)


def test_auto_packs_where_the_sft_fast_path_runs():
    (on, attention), why = preference_packing(dpo(), CUDA)
    assert (on, attention) == (True, "varlen") and why.startswith("fast path for train.objective=dpo: chosen/rejected")
    assert preference_packing(dpo(), Facts(cuda=True, packed_kernel="flex"))[0] == (True, "flex")
    for c, facts, where in ((dpo(), CPU, "no CUDA device"), (dpo(fast__enabled=False), CUDA, "fast.enabled=false"),
                            (dpo(), Facts(cuda=True), "no packed kernel")):
        (on, attention), why = preference_packing(c, facts)
        assert (on, attention) == (False, "sdpa") and why.startswith("fast path off for train.objective=dpo") and where in why


def test_explicit_settings_win():
    (on, attention), why = preference_packing(dpo(fast__preference_packing="on"), CPU)
    assert (on, attention) == (True, "reference") and "per-example reference attention" in why
    assert preference_packing(dpo(fast__preference_packing="on", fast__enabled=False), CUDA)[0] == (True, "varlen")
    assert preference_packing(dpo(fast__preference_packing="on", fast__attention="flex"), CUDA)[0] == (True, "flex")
    # an explicit padded-only kernel never sees a packed row: the reference isolates the sequences
    assert preference_packing(dpo(fast__preference_packing="on", fast__attention="sdpa"), CPU)[0] == (True, "reference")
    (on, _), why = preference_packing(dpo(fast__preference_packing="off"), CUDA)
    assert not on and "fast.preference_packing=off" in why


@pytest.mark.parametrize("objective, trainer", [("orpo", "ORPOTrainer"), ("simpo", "CPOTrainer (loss_type=simpo)")])
def test_reference_free_objectives_stay_padded(objective, trainer):
    (on, attention), why = preference_packing(cfg(train__objective=objective, fast__preference_packing="on"), CUDA)
    assert (on, attention) == (False, "sdpa") and f"{trainer} on padded pairs" in why


def test_the_plan_installs_packing_attention_and_the_decoder_kernels_on_cuda(monkeypatch):
    p = preference_plan(dpo(), gc=True, facts=CUDA)
    assert (p.packing, p.attention, p.gradient_checkpointing, p.checkpointing) == (True, "varlen", True, "own")
    assert p.fused_lora and not p.nf4_kernel and p.compile and not p.offload_checkpoints
    assert not (p.fused_loss or p.cpu_lm_head or p.cpu_embeddings)
    assert p.budget is None and p.micro_batch_size is None
    assert "adapter-off forward is PEFT's" in p.reasons[1] and p.reasons[2].startswith("checkpoints: ours, every layer")
    assert p.reasons[3].startswith("torch.compile on (auto: with our checkpointing")
    assert "our fused loss" in p.reasons[4] and p.reasons[5].startswith("gradient checkpointing on")
    assert preference_plan(dpo(fast__offload_checkpoints="on"), gc=True, facts=CUDA).offload_checkpoints
    # without our checkpointing the policy's layers would compile with grad: auto keeps compile off
    nogc = preference_plan(dpo(), gc=False, facts=CUDA)
    assert not nogc.compile and nogc.checkpointing == "none" and "round apart" in nogc.reasons[2]
    on = preference_plan(dpo(fast__compile="on"), gc=False, facts=CUDA)
    assert on.compile and "round apart in bf16" in on.reasons[2]
    assert not preference_plan(dpo(fast__compile="off"), gc=True, facts=CUDA).compile
    ddp = preference_plan(dpo(), gc=True, facts=Facts(cuda=True, packed_kernel="varlen", distributed=True))
    assert ddp.checkpointing == "hf" and not ddp.compile and "HF's non-reentrant" in ddp.reasons[2]
    q = preference_plan(dpo(model__method="qlora"), gc=True, facts=CUDA)
    assert q.fused_lora and q.nf4_kernel and q.compile and q.checkpointing == "own"
    full = preference_plan(dpo(model__method="full", fast__compile="on"), gc=True, facts=CUDA)
    assert not full.fused_lora and full.compile
    # no decoder kernels where the SFT fast path would not run them: CPU, fast.enabled=false, padded pairs
    for c, facts in ((dpo(fast__preference_packing="on"), CPU), (dpo(fast__preference_packing="on", fast__enabled=False), CUDA),
                     (dpo(fast__preference_packing="off"), CUDA)):
        q = preference_plan(c, gc=False, facts=facts)
        assert not (q.fused_lora or q.compile or q.nf4_kernel)
    fsdp = preference_plan(dpo(model__method="qlora"), gc=False, facts=Facts(cuda=True, packed_kernel="varlen", fsdp=True))
    assert fsdp.packing and not (fsdp.fused_lora or fsdp.nf4_kernel or fsdp.compile)
    assert "under FSDP2: fused LoRA / NF4 kernels and torch.compile off" in fsdp.reasons[1]
    off = preference_plan(dpo(), gc=False, facts=CPU)
    assert (off.packing, off.attention, len(off.reasons)) == (False, "sdpa", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # facts read from the machine
    assert preference_plan(dpo(fast__preference_packing="on")).attention == "reference"
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes under FSDP2: no decoder kernels
    assert "under FSDP2" in preference_plan(dpo(fast__preference_packing="on", distributed__strategy="fsdp")).reasons[1]
