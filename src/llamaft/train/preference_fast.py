"""DPO on packed pair rows (fast.preference_packing, data/pack_pairs.py): one policy forward and one
reference forward over each packed row; TRL computes the loss and every metric.

    class DPOOnOurIds(PackedPairsDPO, ..., DPOTrainer)     # train/preference.py

TRL 1.16's DPOTrainer._compute_loss does it all in one method: the policy forward on its padded
batch (`model(..., labels=, fused_lm_head=True)`: TRL's chunked log-prob head, which DPOTrainer puts
on the model, so no full-vocabulary logits), the reference forward, then the loss and the metrics
from the per-token fields (log_probs, entropy, mean_logits, is_top1). It has no narrower method
(no concatenated_forward / dpo_loss in this version), so `_compute_loss` is the override:
  1. the reference on the packed row under no_grad (LoRA / QLoRA: the adapter disabled; full: the
     frozen reference model), through the same head;
  2. the policy on the packed row (gradients flow through TRL's head into the model);
  3. both outputs' per-token fields laid out as TRL's padded [2B, S-1] (`padded`, pair_index);
  4. TRL's own _compute_loss on that layout: the policy's fields come from a stand-in for the model
     (`_Computed`), the reference's per-sequence sums ride in the batch as ref_chosen_logps /
     ref_rejected_logps: TRL's channel for precomputed references, switched on for the call.
So the loss, rewards, accuracies, margins, logps, entropy, logits/* and token accuracy are TRL's
arithmetic on the numbers its padded path would see (up to the attention kernel's rounding).

A stacked run (model.from_run: stack) has its reference inside the policy: the new adapter off, the
frozen one on (model/adapters.frozen_only). TRL knows two PEFT references only ("ref" adapter, or every
adapter off: the base without the SFT adapter), so padded batches take the same channel as packed
ones: the reference log-probs computed here, TRL's _compute_loss for the rest.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.pack_pairs import PackedPairCollator
from ..model.adapters import frozen_only, is_stacked

# the packed row's keys the model reads (data/pack.flatten)
ROW_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def padded(values: torch.Tensor, pair_index: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed row, [1, T-1] (position t: the prediction of token t+1), as TRL's
    padded [2B, S-1] (column c of row r: the prediction of that sequence's token c+1, made at its token
    c); 0 / False on padding. Gradients flow back to `values`."""
    # a row's last real token predicts nothing: at the row's end its index may be T-1, past `values`
    cells = values[0][pair_index[:, :-1].clamp(max=values.shape[1] - 1)]
    return cells.masked_fill(pair_mask[:, 1:] == 0, 0)


def forward_packed(model, batch: dict):
    """TRL's fused-head forward (FusedCausalLMOutput) of `model` over the packed row in `batch`."""
    return model(**{k: batch[k] for k in ROW_KEYS}, labels=batch["labels"], use_cache=False, fused_lm_head=True)


class _Computed:
    """Stands for the model inside TRL's _compute_loss: hands back the policy's fields, already computed
    on the packed row and laid out padded."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:  # TRL's return_outputs path (compute_metrics) asks for logits: none here
            raise ValueError("packed DPO batches give log-probs, not logits: set fast.preference_packing=off to "
                             "run compute_metrics on logits")
        return self.outputs


@contextlib.contextmanager
def _reference_in_batch(trainer):
    """TRL takes ref_chosen_logps / ref_rejected_logps from the batch while precompute_ref_logps is set."""
    saved = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = saved


class PackedPairsDPO:
    """Mixed in front of TRL's DPOTrainer: packed batches (PackedPairCollator) take the path in the
    module doc; padded ones (TRL's collator) go to TRL as they are."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ld_alpha is not None and isinstance(self.data_collator, PackedPairCollator):
            raise ValueError("ld_alpha weights the reference's tokens inside TRL's padded path: use padded pairs")
        if self.ld_alpha is not None and self._stacked():
            raise ValueError("ld_alpha weights the reference's tokens inside TRL's reference forward: not with a stacked adapter")
        if self.ref_model is not None:  # the frozen reference reads packed rows with the policy's kernel
            from ..model.adapters import base_model
            from ..model.fast.attention import install_attention

            install_attention(self.ref_model, base_model(self.model).config._attn_implementation)

    def _stacked(self) -> bool:
        return self.ref_model is None and is_stacked(self.accelerator.unwrap_model(self.model))

    def _compute_loss(self, model, inputs, return_outputs):
        if "pair_index" not in inputs:
            if not self._stacked():
                return super()._compute_loss(model, inputs, return_outputs)
            ref_chosen, ref_rejected = self.padded_reference_logps(inputs)  # TRL's would be the base (module doc)
            with _reference_in_batch(self):
                return super()._compute_loss(model, {**inputs, "ref_chosen_logps": ref_chosen,
                                                     "ref_rejected_logps": ref_rejected}, return_outputs)
        index, mask = inputs["pair_index"], inputs["pair_mask"]
        ref_chosen, ref_rejected = self.packed_reference_logps(inputs)
        policy = forward_packed(model, inputs)
        fields = {k: padded(getattr(policy, k), index, mask) for k in PER_TOKEN if getattr(policy, k) is not None}
        outputs = type(policy)(**fields, aux_loss=policy.aux_loss)
        ids = inputs["input_ids"][0][index].masked_fill(mask == 0, 0)  # TRL only masks them into labels for the stand-in
        trl_batch = {"input_ids": ids, "attention_mask": mask,
                     "completion_mask": inputs["completion_mask"],
                     "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        with _reference_in_batch(self):
            return super()._compute_loss(_Computed(outputs), trl_batch, return_outputs)

    @torch.no_grad()
    def packed_reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs of the packed batch, summed per sequence as TRL sums its
        padded rows: the frozen reference model, or the policy as its own (reference_adapters)."""
        if self.ref_model is not None:
            out = forward_packed(self.ref_model, inputs)
        else:
            with reference_adapters(self.accelerator.unwrap_model(self.model)):
                out = forward_packed(self.model, inputs)
        logps = padded(out.log_probs, inputs["pair_index"], inputs["pair_mask"]).sum(dim=1)
        return logps.chunk(2, dim=0)  # the padded layout is [chosen..., rejected...]

    @torch.no_grad()
    def padded_reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs of a padded batch as TRL's own reference forward sums
        them (its compute_ref_log_probs: the fused head's log-probs, 0 off the completion), with ours."""
        completion = inputs["completion_mask"]
        row = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        with reference_adapters(self.accelerator.unwrap_model(self.model)):
            out = self.model(**row, labels=inputs["input_ids"].masked_fill(completion == 0, -100), use_cache=False,
                             fused_lm_head=True)
        return out.log_probs[:, -(completion.shape[1] - 1):].sum(dim=1).chunk(2, dim=0)


def reference_adapters(model):
    """The policy as its own DPO reference: a stacked run's frozen adapter alone; else as TRL: the "ref"
    copy of a continued adapter (train/preference.py), or every adapter off. The fused LoRA forward falls
    back to PEFT's for any adapter set but the one it fused (model/fast/lora.py)."""
    if is_stacked(model):
        return frozen_only(model)
    from trl.trainer.utils import use_adapter

    return use_adapter(model, "ref" if "ref" in model.peft_config else None)
