"""GPU fast path for training: packing, varlen attention, fused loss and LoRA, own checkpointing, compile.

What `llamaft.train` calls, in this order:

    plan = choose_plan(cfg, model, lengths) # decide (plan.py): the config, the device, what the model
                                            # allows and the training examples' token counts; frozen
    model = apply_fast_path(model, plan)    # install (install.py): never changes the plan
    collate = make_collator(plan, pad_id)   # padding-free packed rows, or right padding (data.collate)

Every part has a plain reference beside it (attention: per-sequence SDPA; loss: lm_head +
F.cross_entropy; LoRA: PEFT's forward; checkpointing: HF's) and a parity test. On CPU, or with
`fast.enabled: false`, the plan is all off and the model is the plain HF model.
"""

from .install import apply_fast_path, decoder_layers, make_collator, restore_parked
from .memory import configure_allocator
from .plan import FastPlan, choose_plan

__all__ = ["FastPlan", "apply_fast_path", "choose_plan", "configure_allocator", "decoder_layers", "make_collator",
           "restore_parked"]
