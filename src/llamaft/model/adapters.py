"""What gets trained: LoRA / rsLoRA / DoRA adapters through PEFT (lora, qlora), or every weight (full).

    model = apply_adapters(load_base(...), cfg.model, cfg.lora)

qlora differs from lora only by `prepare_quantized` (freeze; no fp32 upcasts) on the 4-bit base that
`load.py` produced — one training loop for all three methods.

model.from_run: stack puts the new adapter ("default") on an existing one loaded frozen ("frozen"):
PEFT's several active adapters, the frozen one's requires_grad kept off (`stack_on`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import LlamaftError
from .load import ADDED_TOKENS_ATTR

log = logging.getLogger(__name__)
FROZEN = "frozen"  # PEFT's name for the adapter a stacked run keeps frozen under its own ("default")


def lora_config(model_cfg, lora_cfg, added_token_ids: list[int] | None = None):
    """Our lora section → peft.LoraConfig (target_modules may be the string 'all-linear')."""
    from peft import LoraConfig

    target = lora_cfg.target_modules if isinstance(lora_cfg.target_modules, str) else list(lora_cfg.target_modules)
    extra = {}
    if added_token_ids:
        # New tokens (e.g. an added <|pad|>) get trainable rows in the input embedding (and the tied
        # or untied lm_head): only those rows train, so the adapter stays small.
        extra["trainable_token_indices"] = list(added_token_ids)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target,
        bias=lora_cfg.bias,
        use_rslora=lora_cfg.use_rslora,
        use_dora=lora_cfg.use_dora,
        **extra,
    )


def apply_adapters(model, model_cfg, lora_cfg, continued: Path | None = None, frozen: Path | None = None):
    """Wrap `model` for training according to model.method; logs the trainable parameter count.
    `continued`: an existing adapter directory (model.from_run: continue), loaded trainable with its
    own LoRA config: the lora section does not apply (one line says so). `frozen`: an existing
    adapter directory (model.from_run: stack) loaded frozen under the new adapter."""
    added = list(getattr(model, ADDED_TOKENS_ATTR, []) or [])
    if model_cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import PeftModel, get_peft_model

        if model_cfg.method == "qlora":
            prepare_quantized(model)
        if continued is not None:
            return _continue_adapter(model, continued, added)
        if frozen is not None:
            _refuse_added_tokens(frozen, added)
            model = PeftModel.from_pretrained(model, str(frozen), adapter_name=FROZEN)
        try:
            new = lora_config(model_cfg, lora_cfg, added)
            model = get_peft_model(model, new) if frozen is None else _stack_adapter(model, new, frozen)
        except ValueError as err:
            first = str(err).strip().splitlines()[0]
            raise LlamaftError(f"lora.target_modules: {first} (use all-linear, or names like q_proj, v_proj)") from None
        setattr(model, ADDED_TOKENS_ATTR, added)
    return _counted(model, model_cfg.method + (" (stacked)" if frozen is not None else ""))


def _stack_adapter(model, config, frozen: Path):
    import torch

    model.add_adapter("default", config)
    model.set_adapter("default")  # PeftModel's own active adapter: what HF / TRL save, resume and copy
    for layer in model.modules():  # the frozen adapter is a fixed function of the input: no dropout in training
        dropouts = getattr(layer, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and FROZEN in dropouts:
            dropouts[FROZEN] = torch.nn.Identity()
    stack_on(model)
    _say(f"lora: a new adapter (r={config.r}, alpha={config.lora_alpha}) on the frozen adapter {frozen}")
    return model


def _refuse_added_tokens(frozen: Path, added: list[int]) -> None:
    import json

    if added or json.loads((frozen / "adapter_config.json").read_text(encoding="utf-8")).get("trainable_token_indices"):
        raise LlamaftError(f"model.from_run: stack: added tokens (<|pad|>) train their own embedding rows, which PEFT "
                           f"cannot stack on the adapter {frozen}; use model.from_run merge or continue")


def is_stacked(model) -> bool:
    return FROZEN in getattr(model, "peft_config", {})


def stack_on(model) -> None:
    """Both adapters in the forward, only the new one trainable. PEFT's set_adapter (and leaving its
    disable_adapter) marks every active adapter trainable: call this after any of them. "default"
    first: HF's resume loads a checkpoint's adapter into active_adapters[0]."""
    model.base_model.set_adapter(["default", FROZEN])
    model.base_model.set_requires_grad(FROZEN, False)


@contextmanager
def frozen_only(model):
    """A stacked model as the run started from it (the new adapter off, the frozen one on): DPO's reference."""
    model.base_model.set_adapter([FROZEN], inference_mode=True)
    try:
        yield
    finally:
        stack_on(model)


def _continue_adapter(model, adapter: Path, added: list[int]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    setattr(model, ADDED_TOKENS_ATTR, added)
    own = model.peft_config["default"]
    _say(f"lora: continuing the adapter {adapter} with its own settings (r={own.r}, alpha={own.lora_alpha}); "
         f"this config's lora section does not apply")
    return _counted(model, "lora (continued)")


def _say(msg: str) -> None:
    log.info(msg)
    if os.environ.get("RANK", "0") == "0":  # several processes (DDP): one line per run, not one per process
        print(msg)


def _counted(model, method: str):
    trainable, total = count_parameters(model)
    _say(f"{method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    return model


def prepare_quantized(model) -> None:
    """Freeze a 4/8-bit base for LoRA without peft's prepare_model_for_kbit_training, which casts every
    non-quantised weight to fp32: on Llama-3.1-8B that doubles the embeddings and lm_head (+2 GiB of
    a ~7 GiB QLoRA budget) and sends fp32 activations into bf16 kernels. HF's RMSNorm already
    computes in fp32 internally, and the adapters PEFT adds are fp32 either way. Checkpointing needs
    no input-grad hook: HF's is non-reentrant and ours (model/fast/recompute.py) has its own.
    (load_base has already switched the KV cache off.)"""
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); PEFT knows how to count 4-bit packed weights. A frozen input embedding
    table kept in CPU memory by the fast path (model/fast/embed.py) is no registered parameter any
    more but still part of the model: it is counted too."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and "weight" not in emb._parameters and getattr(emb, "weight", None) is not None:
        total += emb.weight.numel()
    return trainable, total


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def base_model(model):
    """The HF model under a PEFT wrapper (the model itself when it has none): where the fast path
    finds the lm_head, the embeddings, the decoder layers and the attention setting."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_trained(model, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """adapter/ (PEFT format) or model/ (full weights): safetensors only. `state_dict`: the weights
    when the model's own are not whole (FSDP shards: train/fsdp.full_state_dict gathers them).

    With added tokens the whole (resized) embedding and lm_head travel with the adapter, so merge and
    load_for_inference never depend on re-creating new rows the same way.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    given = {"state_dict": state_dict} if state_dict is not None else {}
    if is_peft(model):
        added = bool(getattr(model, ADDED_TOKENS_ATTR, None))
        # TRL's frozen "ref" copy of a continued adapter, a stacked run's frozen adapter: no part of what the run trained
        only = {"selected_adapters": ["default"]} if len(model.peft_config) > 1 else {}
        model.save_pretrained(str(out_dir), save_embedding_layers=added, **given, **only)
    else:
        model.save_pretrained(str(out_dir), **given)
