"""model.fast.plan_preference: which DPO runs pack their pairs, with which attention, and why."""

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


def test_orpo_stays_padded():
    (on, attention), why = preference_packing(cfg(train__objective="orpo", fast__preference_packing="on"), CUDA)
    assert (on, attention) == (False, "sdpa") and "ORPOTrainer on padded pairs" in why


def test_the_plan_installs_only_packing_and_attention(monkeypatch):
    p = preference_plan(dpo(), gc=True, facts=CUDA)
    assert (p.packing, p.attention, p.gradient_checkpointing, p.checkpointing) == (True, "varlen", True, "hf")
    assert not (p.fused_loss or p.compile or p.fused_lora or p.cpu_lm_head or p.cpu_embeddings or p.nf4_kernel)
    assert p.budget is None and p.micro_batch_size is None
    assert len(p.reasons) == 3 and "our fused loss" in p.reasons[1] and p.reasons[2].startswith("gradient checkpointing on")
    off = preference_plan(dpo(), gc=False, facts=CPU)
    assert (off.packing, off.attention, len(off.reasons)) == (False, "sdpa", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # facts read from the machine
    assert preference_plan(dpo(fast__preference_packing="on")).attention == "reference"
