"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before any model loads.

    cfg = load_config("configs/llama-3.1-8b-lora.yaml", ["lora.r=32", "train.learning_rate=2e-4"])

Unknown keys and wrong types raise `ConfigError` naming the dotted key (and the closest valid key).
Our config names what users choose; `train/` maps it onto HF `TrainingArguments`.

    base.py       the sections' base: unknown keys are errors, bare on/off read as typed
    sections.py   the sections (model, lora, quantization, data, train, fast, distributed, eval) and RunConfig
    load.py       YAML reading, overrides, error messages, relative paths (a run's: against the run), save_config
"""

from .load import RUN_SOURCES, apply_overrides, config_from_dict, load_config, read_sources, resolve_paths, save_config
from .sections import (ColumnsConfig, DataConfig, DistributedConfig, EvalConfig, Every, FastConfig, GenerationEvalConfig,
                       LoraConfig, ModelConfig, QuantizationConfig, RunConfig, TrainConfig)

__all__ = [
    "load_config", "config_from_dict", "save_config", "apply_overrides", "resolve_paths", "read_sources", "RUN_SOURCES",
    "RunConfig", "ModelConfig", "LoraConfig", "QuantizationConfig", "ColumnsConfig", "DataConfig", "TrainConfig",
    "FastConfig", "DistributedConfig", "GenerationEvalConfig", "EvalConfig", "Every",
]
