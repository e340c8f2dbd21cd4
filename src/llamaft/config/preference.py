"""The `dpo:`, `orpo:` and `simpo:` sections: preference alignment settings (train.objective picks the method).

    train: {objective: dpo}
    dpo: {beta: 0.1, loss_type: sigmoid, reference: auto}

Only what users choose is here; train/preference.py maps it onto TRL's DPOConfig / ORPOConfig / CPOConfig.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import _Section

# TRL's DPOTrainer losses (trl/trainer/dpo_config.py: DPOConfig.loss_type) that need nothing else
# from us than beta (and label_smoothing for robust / exo_pair).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class DpoConfig(_Section):
    """Direct Preference Optimization (TRL's DPOTrainer), used when train.objective=dpo."""

    beta: float = Field(0.1, gt=0, description="How far the model may move from the reference (higher: less).")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, ...")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust / exo_pair: the share of preference labels assumed flipped.")
    reference: str = Field(
        "auto", description="The frozen reference: adapter-off (LoRA/QLoRA: the base with the adapter disabled, no second copy), "
        "a model path or hub id, or auto (adapter-off for lora/qlora, a second copy of the base for full)."
    )

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("use auto, adapter-off or a model path")
        return v


class OrpoConfig(_Section):
    """Odds Ratio Preference Optimization (TRL's ORPOTrainer): SFT on chosen + an odds-ratio penalty, no reference."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda in the ORPO paper).")


class SimpoConfig(_Section):
    """SimPO (TRL's CPOTrainer, loss_type simpo, no NLL term): reference-free DPO on each answer's mean
    token log-prob, with a target margin: loss = -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma)."""

    beta: float = Field(2.0, gt=0, allow_inf_nan=False, description="Reward scale: beta times the answer's mean token log-prob.")
    gamma: float = Field(0.5, ge=0, allow_inf_nan=False,
                         description="Target reward margin between chosen and rejected (TRL's simpo_gamma).")


def check_objective(cfg) -> None:
    """Cross-section rules, as ValueError messages naming the key (RunConfig's validator raises them)."""
    objective = cfg.train.objective
    if objective == "dpo" and cfg.dpo.reference == "adapter-off" and cfg.model.method == "full":
        raise ValueError("dpo.reference: adapter-off needs model.method lora or qlora (full fine-tuning has no adapter "
                         "to disable); use auto or a model path")
    if objective != "sft" and cfg.data.train_on == "all":
        raise ValueError("data.train_on: preference objectives train the chosen/rejected completions only; "
                         "leave data.train_on=completion")
