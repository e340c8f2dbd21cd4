"""Preference objectives (train.objective dpo / orpo / simpo) on TRL's trainers, fed with OUR token ids.

    parts = objective_parts(cfg, run, dtype)     # what the one training path (recipe.py) builds its Trainer from
    trainer = parts.cls(model=..., args=..., train_dataset=parts.train, ..., **parts.kwargs)

The losses are TRL's (DPOTrainer, trl.experimental.orpo.ORPOTrainer, and for SimPO
trl.experimental.cpo.CPOTrainer with loss_type=simpo and cpo_alpha=0: no NLL term); what is ours:
- the data: data/chat.encode_pair gives prompt_ids / chosen_ids / rejected_ids; TRL's own
  tokenization (`_prepare_dataset`, `tokenize_row`) is replaced by a pass-through, so the prompt
  tokens are exactly SFT's and inference's and each completion ends with its trained turn-end token;
- the reference (dpo.reference): LoRA / QLoRA train against the base with the adapter disabled (TRL
  would add a second "ref" adapter: it is removed, nothing is copied), full fine-tuning against a
  second frozen copy of the base, or any model path; continuing a run's adapter (model.from_run:
  continue): TRL's frozen "ref" copy of that adapter, kept out of adapter/ and checkpoints; a new
  adapter stacked on a run's frozen one (stack): the new adapter off (train/preference_fast.py);
- the Trainer: our AtomicCheckpointTrainer (atomic, finite-only checkpoints, the non-finite guard)
  mixed in front of TRL's, so checkpoints, resume, summary and callbacks are those of SFT;
- the metric names, per named validation set: eval/<set>/preference_accuracy (chosen reward >
  rejected reward), reward_margin, logps_chosen, logps_rejected, ... in metrics.jsonl,
  TensorBoard and summary.json.

The fast path for DPO (fast.preference_packing; model/fast/plan_preference.py decides, its reason
lines say what runs): pairs packed into padding-free rows (data/pack_pairs.py), the policy and the
reference each one forward over them, TRL's chunked log-prob head (no full-vocabulary logits) and
TRL's loss and metrics (train/preference_fast.py). Otherwise, and for ORPO / SimPO, pairs are padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.chat import PreferenceExample
from ..model.adapters import is_stacked, stack_on
from ..model.from_run import continued_adapter
from ..model.load import load_base
from .checkpoint import AtomicCheckpointTrainer
from .preference_fast import PackedPairsDPO
from .setup import ListDataset, gradient_checkpointing, pick_collator_and_plan

# TRL's metric names -> ours (eval/<set>/<name>, train/<name>); others keep theirs with '/' -> '_'.
METRIC_NAMES = {
    "rewards/accuracies": "preference_accuracy", "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "logits/chosen": "logits_chosen", "logits/rejected": "logits_rejected",
}
# What summary.json's `eval` keeps per set (besides the loss).
SUMMARY_METRICS = ("preference_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen",
                   "logps_rejected", "nll_loss", "log_odds_ratio")


@dataclass
class TrainerParts:
    """What differs between objectives when recipe.build_trainer makes its Trainer."""

    cls: type
    train: Any
    eval: dict
    args_cls: type | None = None  # None: HF TrainingArguments
    args: dict = field(default_factory=dict)  # extra TrainingArguments / TRL config fields
    collator: Any = None  # None: pick_plan's (SFT, DPO); ORPO / SimPO: TRL's pair collator with our pad id (never EOS)
    kwargs: dict = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)


def objective_parts(cfg, run, dtype) -> TrainerParts:
    """SFT: our Trainer over ListDatasets. dpo / orpo / simpo: TRL's trainer (with ours in front) over our pair ids."""
    objective = cfg.train.objective
    if objective == "sft":
        train = ListDataset(run.data.train)
        return TrainerParts(AtomicCheckpointTrainer, train, {n: ListDataset(run.data.validation[n]) for n in run.set_names},
                            lengths=train.lengths())
    import os

    from datasets import Dataset, disable_progress_bars  # late: only preference runs need it

    disable_progress_bars()  # TRL maps the (already tokenized) sets: no "Map: 100%" bars between our lines

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO / CPO live in trl.experimental: the API is pinned in pyproject.toml

    def rows(examples):
        return Dataset.from_list([{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids,
                                   "rejected_ids": e.rejected_ids} for e in examples])

    train = rows(run.data.train)
    evals = {n: rows(run.data.validation[n]) for n in run.set_names}
    common = dict(remove_unused_columns=False, beta=getattr(cfg, objective).beta, max_length=None)
    if objective in ("orpo", "simpo"):
        return _reference_free_parts(cfg, run, train, evals, dict(common, max_length=cfg.data.max_seq_length))
    from trl import DPOConfig

    d = cfg.dpo
    args = dict(common, loss_type=[d.loss_type], label_smoothing=d.label_smoothing, pad_to_multiple_of=None)
    keep = continued_adapter(run.started_from) is not None  # the reference: the continued adapter as loaded
    return TrainerParts(_dpo_class(), train, evals, DPOConfig, args,  # the collator: pick_plan's (packed or padded)
                        kwargs={"processing_class": run.tokenizer, "ref_model": reference_model(cfg, run, dtype),
                                "keep_ref_adapter": keep})


def _reference_free_parts(cfg, run, train, evals, common: dict) -> TrainerParts:
    """ORPO (TRL's ORPOTrainer) or SimPO (TRL's CPOTrainer with loss_type=simpo): padded pairs, no reference."""
    from trl.experimental.utils import DPODataCollatorWithPadding

    if cfg.train.objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer, config, args = ORPOTrainer, ORPOConfig, dict(common, padding_value=run.rules.pad_id)
    else:  # CPOTrainer pads with the tokenizer's pad id: ours (model/tokenizer.py), never EOS
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        # cpo_alpha=0: SimPO is the margin loss alone (CPO's default 1.0 adds an NLL term on chosen)
        trainer, config, args = CPOTrainer, CPOConfig, dict(common, loss_type="simpo", cpo_alpha=0.0,
                                                            simpo_gamma=cfg.simpo.gamma)
    return TrainerParts(_padded_pairs_class(trainer), train, evals, config, args,
                        DPODataCollatorWithPadding(pad_token_id=run.rules.pad_id), kwargs={"processing_class": run.tokenizer})


def pick_plan(cfg, model, pad_id: int, lengths: list[int]):
    """setup.pick_collator_and_plan for SFT; dpo / orpo / simpo: model/fast/plan_preference's plan (packed
    DPO pairs, or padded pairs), installed, and its collator (ORPO's / SimPO's comes with objective_parts)."""
    if cfg.train.objective == "sft":
        return pick_collator_and_plan(cfg, model, pad_id, lengths)
    from ..model.fast import apply_fast_path
    from ..model.fast.plan_preference import preference_plan

    plan = preference_plan(cfg, model, gc=gradient_checkpointing(cfg.train))  # HF's, plain rule: auto = on for GPUs
    if plan.packing:
        from ..data.pack_pairs import PackedPairCollator

        collator = PackedPairCollator()
    else:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        collator = DataCollatorForPreference(pad_token_id=pad_id)
    return apply_fast_path(model, plan), collator, plan


def reference_model(cfg, run, dtype):
    """The frozen DPO reference, or None for the base with the adapter disabled (LoRA / QLoRA)."""
    ref = cfg.dpo.reference
    if ref in ("auto", "adapter-off") and cfg.model.method != "full":
        return None
    model_cfg = cfg.model if ref == "auto" else cfg.model.model_copy(update={"name": ref, "gguf_file": None})
    model = load_base(model_cfg, cfg.quantization, run.rules, run.tokenizer, dtype)
    model.requires_grad_(False)
    return model.eval()


def eval_metrics(metrics: dict, set_names: list[str]) -> dict[str, dict]:
    """{set: {preference_accuracy, reward_margin, ...}} from one evaluation's HF metrics (eval_<set>_<name>)."""
    return {n: {m: metrics[f"eval_{n}_{m}"] for m in SUMMARY_METRICS if f"eval_{n}_{m}" in metrics} for n in set_names}


def _renamed(values: dict, prefix: str) -> dict:
    return {prefix + METRIC_NAMES.get(k, k.replace("/", "_")): v for k, v in values.items()}


class _PerSetMetrics:
    """TRL logs its metrics without the validation set's name (eval_rewards/accuracies for every set):
    each evaluate() call remembers its set's prefix and the log renames them eval_<set>_<name>."""

    _eval_prefix = "eval"

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL writes a model card (README.md) into checkpoints/ at every save, outside the atomic
        staging; the run directory describes itself (summary.json, report.md): none is written."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if isinstance(eval_dataset, str):  # HF evaluates a dict of sets one by one, by name
            metric_key_prefix = metric_key_prefix if metric_key_prefix.endswith(f"_{eval_dataset}") else f"eval_{eval_dataset}"
        self._eval_prefix = metric_key_prefix
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _dpo_class():
    from trl import DPOTrainer

    class DPOOnOurIds(PackedPairsDPO, _PerSetMetrics, AtomicCheckpointTrainer, DPOTrainer):
        """DPOTrainer on data/chat's ids (packed pairs: preference_fast.py), with our checkpoints and non-finite guard."""

        def __init__(self, *args, keep_ref_adapter: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            peft_config = getattr(self.model, "peft_config", {})
            # TRL copies a PeftModel's adapter as "ref": a fresh adapter starts at zero, so the reference is
            # the model without it (the base; stacked: base + frozen adapter) and the copy goes; a continued
            # one (model.from_run: continue) keeps it (TRL uses it)
            if "ref" in peft_config and not keep_ref_adapter:
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")
            if is_stacked(self.model):  # set_adapter("default") left the frozen adapter out of the forward
                stack_on(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (data/chat.encode_pair)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            values = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
            self._metrics[mode].clear()  # TRL's log adds nothing more
            logs.update(_renamed(values, "" if mode == "train" else f"{self._eval_prefix}_"))
            super().log(logs, start_time)

    return DPOOnOurIds


def _padded_pairs_class(base: type) -> type:
    """`base` (TRL's ORPOTrainer or CPOTrainer: the same tokenize_row / _stored_metrics machinery) on
    data/chat's ids, with our checkpoints and non-finite guard."""

    class PairsOnOurIds(_PerSetMetrics, AtomicCheckpointTrainer, base):
        def __init__(self, *args, eval_dataset=None, **kwargs):
            # TRL maps one eval Dataset, not a dict of named sets: it gets the first, then every
            # set goes through the same tokenize_row pass-through
            first = next(iter(eval_dataset.values())) if isinstance(eval_dataset, dict) else eval_dataset
            super().__init__(*args, eval_dataset=first, **kwargs)
            if isinstance(eval_dataset, dict):
                self.eval_dataset = {n: d.map(self.tokenize_row) for n, d in eval_dataset.items()}
            self.use_dpo_data_collator = True  # it is TRL's DPODataCollatorWithPadding, given our pad id

        def tokenize_row(self, feature, model=None) -> dict:
            ex = PreferenceExample(list(feature["prompt_ids"]), list(feature["chosen_ids"]),
                                   list(feature["rejected_ids"]), "")
            row = {"prompt_input_ids": ex.prompt_ids, "prompt_attention_mask": [1] * len(ex.prompt_ids)}
            for name in ("chosen", "rejected"):
                side = ex.side(name)  # prompt + completion, labels ignored on the prompt
                row[f"{name}_input_ids"], row[f"{name}_labels"] = side.input_ids, side.labels
                row[f"{name}_attention_mask"] = [1] * len(side.input_ids)
            return row

        def log(self, logs: dict, start_time: float | None = None) -> None:
            mode = "train" if "loss" in logs else "eval"
            stored = self._stored_metrics.pop(mode, {})
            values = {k.removeprefix("eval_"): sum(v) / len(v) for k, v in stored.items() if v}
            if getattr(self, "cpo_alpha", None) == 0:  # SimPO: CPO logs nll_loss 0.0, never computed
                values.pop("nll_loss", None)
            logs.update(_renamed(values, "" if mode == "train" else f"{self._eval_prefix}_"))
            super().log(logs, start_time)

    PairsOnOurIds.__name__ = PairsOnOurIds.__qualname__ = f"{base.__name__}OnOurIds"
    return PairsOnOurIds
