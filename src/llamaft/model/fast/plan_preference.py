"""The plan for preference objectives (train.objective dpo / orpo): `preference_plan(cfg, model, gc)`.

    plan = preference_plan(cfg, model, gc=True)    # a FastPlan: pair packing + its attention, or plain
    print("\\n".join(plan.reasons))               # summary.json's `fast_path`

Of the SFT fast path, DPO takes what works on the batch and inside attention: pairs packed into
padding-free rows (data/pack_pairs.py) and the packed attention kernel (varlen / flex on CUDA, the
per-example reference where neither runs), and on CUDA the decoder's kernels: fused LoRA linears (the
NF4 one for QLoRA) as SFT decides them (plan.fused_lora, nf4_kernel), and torch.compile of the layers
only when asked (`preference_compile`). The reference forward runs the same layers with the adapter
disabled: the fused forward hands that state to PEFT's own (model/fast/lora.py). The
log-probs come from TRL's own chunked log-prob head (trl's add_fused_lm_head, installed by
DPOTrainer): no full-vocabulary logits, on packed rows as on padded pairs. Everything else stays off
(PREFERENCE_OFF); ORPO stays on TRL's plain padded path. Deciders return (value, reason), as in plan.py.
"""

from __future__ import annotations

from dataclasses import replace

from . import attention as _attention
from .plan import FastPlan, Facts, fused_lora, nf4_kernel, read_facts

PREFERENCE_OFF = ("off for preference objectives: our fused loss and parked lm_head (TRL's chunked log-prob head "
                  "computes the pair log-probs, no full-vocabulary logits), our checkpointing, CPU embeddings, "
                  "the memory budget and micro-batch regrouping (written and measured for SFT)")


def preference_packing(cfg, facts: Facts):
    """((packing, attention), first reason line): DPO pairs packed where the SFT fast path would run
    (auto: fast.enabled on CUDA with a packed kernel), or anywhere when fast.preference_packing=on."""
    objective, setting = cfg.train.objective, cfg.fast.preference_packing
    head = f"fast path off for train.objective={objective}"
    plain = "sdpa" if cfg.fast.attention == "auto" else cfg.fast.attention  # padded rows: HF's mask path
    if objective != "dpo":
        return (False, plain), (f"{head}: TRL's ORPOTrainer on padded pairs (full-vocabulary logits; "
                                "fast.preference_packing is DPO's)")
    if setting == "off":
        return (False, plain), f"{head}: pairs padded, not packed (fast.preference_packing=off)"
    kernel = cfg.fast.attention if cfg.fast.attention in ("varlen", "flex") else facts.packed_kernel
    if setting == "auto" and not (cfg.fast.enabled and facts.cuda and kernel):
        where = "fast.enabled=false" if not cfg.fast.enabled else "no CUDA device" if not facts.cuda else "no packed kernel"
        return (False, plain), (f"{head}: pairs padded, not packed (fast.preference_packing=auto, {where}); "
                                "TRL's chunked log-prob head (no full-vocabulary logits)")
    attention = kernel or "reference"
    how = "per-example reference attention: correct, not fast" if attention == "reference" else f"attention {attention}"
    return (True, attention), (f"fast path for train.objective=dpo: chosen/rejected pairs packed into padding-free rows "
                               f"(fast.preference_packing={setting}), {how}; policy and reference log-probs from the "
                               "same packed rows by TRL's chunked log-prob head; TRL's loss and metrics")


def preference_compile(cfg):
    """torch.compile of the decoder layers for DPO: only with fast.compile=on. Compiled, the policy's
    layers (adapter on, with grad) and the reference's (adapter off, no grad) become different graphs
    whose bf16 rounding differs: at step 1, where policy and reference are the same model, the loss
    was 0.660 instead of ln 2 = 0.693 on the H200 (benchmarks/results/dpo_h200/dpo_fixed_nogc.json:
    compiled, checkpointing off), a reward offset summed over every token of a sequence. The eager runs
    gave exactly ln 2 (dpo_fixed.json, dpo_mixed.json: checkpointing on, which leaves the forward's
    arithmetic as it is): eager, both run the same kernels."""
    on = cfg.fast.compile == "on"
    if on:
        return True, ("torch.compile on (fast.compile=on); the policy's and the reference's compiled layers round "
                      "apart in bf16 (step-1 loss not exactly ln 2)")
    why = "fast.compile=off" if cfg.fast.compile == "off" else (
        "auto: off for DPO, the policy's and reference's compiled layers round apart in bf16; fast.compile=on to take it")
    return False, f"torch.compile off ({why})"


def preference_plan(cfg, model=None, gc: bool = False, facts: Facts | None = None) -> FastPlan:
    """The FastPlan of a dpo / orpo run: packing and its attention kernel, on CUDA fused LoRA / NF4 and
    compile when asked (install.apply_fast_path installs those and HF's checkpointing), every other piece off. `gc`: HF's gradient
    checkpointing as the plain path decides it (train/setup.gradient_checkpointing)."""
    if facts is None:  # as SFT's plan reads them; the packed kernel probed even with fast.enabled=false: `on` wins
        facts = read_facts(cfg, model)
        if facts.cuda and facts.packed_kernel is None:
            facts = replace(facts, packed_kernel=_attention.best_packed_attention())
    (packing, attention), first = preference_packing(cfg, facts)
    reasons = [first]
    kernels = packing and facts.cuda and cfg.fast.enabled and not facts.fsdp  # where SFT's fast path runs them
    if packing and facts.fsdp:
        reasons.append("under FSDP2: fused LoRA / NF4 kernels and torch.compile off (not validated on sharded weights)")
    lora = nf4 = comp = False
    if kernels:
        if cfg.model.method != "full":
            lora, why = fused_lora(model)
            reasons.append(f"{why}; the reference's adapter-off forward is PEFT's")
            nf4, why = nf4_kernel(cfg)
            reasons += [why] if why else []
        comp, why = preference_compile(cfg)
        reasons.append(why)
    if packing:
        reasons.append(f"other fast-path pieces {PREFERENCE_OFF}")
    reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (train.gradient_checkpointing="
                   f"{cfg.train.gradient_checkpointing})")
    return FastPlan(packing, attention, False, gc, comp, tuple(reasons), fused_lora=lora, nf4_kernel=nf4)
