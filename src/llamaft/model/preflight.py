"""What can be checked about the model before its weights load (and before a run directory exists).

    check_model(cfg.model, cfg.lora, tokenizer, rules)   # one-line LlamaftError, or None

The model is built on the meta device from its config alone (a local `config.json`, GGUF metadata,
or the hub's `config.json`): module names and shapes, no memory, under a second for 8B. Then:

- the source exists (a directory, a .gguf file, or a reachable / cached hub repository);
- the tokenizer fits the embeddings: a tokenizer with more ids than embedding rows would make
  `resize_token_embeddings` grow the matrix with untrained rows (e.g. Meta's 128,256-id tokenizer on
  SmolLM2's 49,152 rows) and train garbage. Growing is allowed only for tokens llamaft added on
  request (`model.add_pad_token`). Fewer ids than rows is normal (Llama 3 and others pad the matrix),
  except for an explicit `model.tokenizer` far smaller than the model: another model's tokenizer.
- every `lora.target_modules` name matches a module the way PEFT matches a list (the module's full
  name equals it or ends with `.name`), and that module is one LoRA can wrap.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LlamaftError
from .source import check_source, model_source

# An explicit model.tokenizer this many ids short of the embedding rows is another model's tokenizer.
# (Padding the matrix for kernel-friendly shapes adds at most a few hundred rows: Qwen2.5 399, Phi-3 53.)
FOREIGN_GAP = 1024


def meta_model(model_cfg):
    """The base model built on the meta device from its config (no weights read, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    check_source(model_cfg.name, "model.name", model_cfg.revision, model_cfg.gguf_file)
    name, gguf = model_source(model_cfg)
    try:
        config = AutoConfig.from_pretrained(name, gguf_file=gguf, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - missing/garbled config.json, unknown architecture, hub errors
        raise LlamaftError(f"model.name '{model_cfg.name}': cannot read the model's config ({_first_line(err)})"
                           f"{_run_dir_hint(model_cfg.name)}") from None
    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as err:  # e.g. "Unrecognized configuration class ... for this kind of AutoModel"
        raise LlamaftError(f"model.name '{model_cfg.name}': not a causal language model "
                           f"({type(config).__name__}: {_first_line(err)})") from None


def check_model(model_cfg, lora_cfg, tokenizer, rules) -> None:
    """Every model check that needs no weights (see the module docstring); one line on failure."""
    model = meta_model(model_cfg)
    check_vocab(model_cfg, len(tokenizer), embedding_rows(model), len(getattr(rules, "added_tokens", None) or []))
    if model_cfg.method != "full":
        check_target_modules(lora_cfg.target_modules, model, model_cfg.name)


def embedding_rows(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab(model_cfg, n_ids: int, rows: int, n_added: int = 0) -> None:
    """The tokenizer's ids fit the embedding matrix (new rows only for tokens added on request)."""
    explicit = model_cfg.tokenizer
    if n_ids - n_added <= rows and not (explicit and rows - n_ids > FOREIGN_GAP):
        return
    if explicit:
        raise LlamaftError(
            f"model.tokenizer={explicit} has {n_ids:,} ids but model '{model_cfg.name}' has {rows:,} embedding rows "
            "(its vocabulary): it was trained with another tokenizer; remove model.tokenizer to use the model's own, "
            "or set it to the tokenizer the model was trained with"
        )
    raise LlamaftError(
        f"model.name '{model_cfg.name}': its tokenizer has {n_ids - n_added:,} ids but the model has {rows:,} embedding rows "
        "(its vocabulary); set model.tokenizer to the tokenizer the model was trained with "
        "(new tokens are added only with model.add_pad_token: true)"
    )


# Module types PEFT's LoRA can wrap (peft.tuners.lora.LoraModel._create_new_module dispatches on these).
def _lora_types() -> tuple[type, ...]:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def check_target_modules(target_modules, model, model_name: str = "the model") -> None:
    """Each listed name must match at least one wrappable module, as PEFT matches a list: the module's
    full name equals the entry or ends with `.` + entry. ('all-linear' always matches.)"""
    if isinstance(target_modules, str):
        return
    types = _lora_types()
    modules = [(n, m) for n, m in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, types[:1] + types[-1:]) and not n.endswith("lm_head")})
    for target in target_modules:
        hits = [(n, m) for n, m in modules if n == target or n.endswith("." + target)]
        if not hits:
            close = _close(target, linear)
            raise LlamaftError(
                f"lora.target_modules: no module named '{target}' in {model_name}{close} "
                f"(its linear layers: {', '.join(linear)}; or use all-linear)"
            )
        if not any(isinstance(m, types) for _, m in hits):
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise LlamaftError(
                f"lora.target_modules: '{target}' names {'/'.join(kinds)} modules, which LoRA cannot wrap; "
                f"name linear layers ({', '.join(linear)}) or use all-linear"
            )


def _close(name: str, options: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _run_dir_hint(name: str) -> str:
    # (A llamaft run directory never gets here: training resolves it to its base first, model/from_run.py.)
    p = Path(name)
    if p.is_dir() and not (p / "config.json").is_file():
        return "; a model directory needs config.json and the weights (save_pretrained writes both)"
    return ""
