"""Tiny random Llama + WordLevel tokenizer + hand-built Examples for CPU training tests (seconds)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from llamaft.config import config_from_dict

VOCAB = 64


@dataclass
class Rules:  # same fields as llamaft.model.tokenizer.TokenRules (the parts training reads)
    pad_id: int = 0
    eos_id: int = 1
    stop_ids: list = field(default_factory=lambda: [1, 3])
    turn_end_ids: list = field(default_factory=lambda: [3])
    family: str = "other"
    instruct: bool = False
    chat_template: str | None = None
    template_kwargs: dict = field(default_factory=dict)
    added_tokens: list = field(default_factory=list)  # tokens the tokenizer layer added (e.g. <|pad|>)


@dataclass
class Ex:
    input_ids: list
    labels: list
    where: str = "test"


@dataclass
class Data:
    train: list
    validation: dict
    test: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"rows": 0})


def tokenizer(extra_pad: bool = False):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<eot>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    if extra_pad:  # like model.add_pad_token: a new id past the embedding matrix
        t.add_special_tokens({"pad_token": "<|pad|>"})
    t.padding_side = "right"
    return t


def tiny_model_dir(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    out = root / "tiny-llama"
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def examples(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(4, 11))] + [1]
        out.append(Ex(ids, [-100, -100] + ids[2:]))
    return out


def dataset() -> Data:
    return Data(train=examples(32, 1), validation={"alpha": examples(8, 2), "b_set": examples(6, 3)})


def run_config(model_dir: Path, out_dir: Path, **train) -> object:
    raw = {
        "model": {"name": str(model_dir), "method": train.pop("method", "lora")},
        "lora": {"r": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0)},
        "data": {"train": ["unused.jsonl"]},
        "train": {"output_dir": str(out_dir), "max_steps": 8, "micro_batch_size": 4, "gradient_accumulation": 2,
                  "learning_rate": 1e-2, "save_every": 3, "eval_every": 0.25, "logging_every": 1,
                  "save_total_limit": 2, **train},
        "fast": {"enabled": False},
    }
    return config_from_dict(raw)


def patch_data_layer(monkeypatch, data: Data | None = None, extra_pad: bool = False):
    """Stand-ins for the tokenizer/data modules (owned elsewhere) so these tests pin training only."""
    from llamaft.train import recipe

    tok = tokenizer(extra_pad)
    rules = Rules(pad_id=tok.pad_token_id, added_tokens=["<|pad|>"] if extra_pad else [])
    calls = []

    def save_tok(t, r, out):
        from transformers import GenerationConfig

        t.save_pretrained(out)
        GenerationConfig(eos_token_id=list(r.stop_ids), pad_token_id=r.pad_id).save_pretrained(out)

    def build(data_cfg, t, r, splits=None):
        calls.append("build_datasets")
        return data or dataset()

    monkeypatch.setattr(recipe, "load_tokenizer", lambda m, d: (tok, rules))
    monkeypatch.setattr(recipe, "build_datasets", build)
    monkeypatch.setattr(recipe, "split_conversations", lambda data_cfg: None)
    monkeypatch.setattr(recipe, "save_tokenizer", save_tok)
    return tok, rules, calls


# ---------------------------------------------------------------------------------------------
# `llamaft train` in a child process (exit codes, stderr, SIGKILL): real tokenizer/data modules on a
# tiny byte-level Llama, no monkeypatching across the process boundary.


def cli_project(root: Path, **train) -> Path:
    """A base model dir, 24 q/a rows and a run config under root; returns the config path.
    `train` entries override the config's train section (run dir: root/run)."""
    import json

    import yaml

    from inference_helpers import save_model_dir, tiny_model, tiny_rules, tiny_tokenizer

    tok = tiny_tokenizer()
    base = save_model_dir(tiny_model(vocab_size=len(tok)), tok, tiny_rules(tok), root / "base")
    rng = random.Random(5)
    rows = [{"question": " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))),
             "answer": rng.choice(["yes", "no", "maybe"])} for _ in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": {"name": str(base), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [str(root / "train.jsonl")], "format": "qa", "val_ratio": 0.0},
        "train": {"output_dir": str(root / "run"), "max_steps": 6, "micro_batch_size": 4, "gradient_accumulation": 2,
                  "learning_rate": 1e-2, "scheduler": "constant", "save_every": 1, "eval_every": 0,
                  "save_total_limit": 2, "report_to": [], **train},
        "fast": {"enabled": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_child(*args: str, kill: str | None = None, timeout: int = 300):
    """`llamaft ARGS` in a child process (tests/train_child.py), optionally SIGKILLed at PHASE:STEP."""
    import os
    import subprocess
    import sys

    child = Path(__file__).with_name("train_child.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(child), *(["--kill", kill] if kill else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Fault injection through public Trainer callbacks (train(cfg, callbacks=[...]))


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class InjectNaNLoss(_callback_base()):
    """The loss (and so every gradient) is NaN during the given optimizer steps (1-based): a forward
    hook on lm_head multiplies the logits by NaN while such a step runs (evaluation is left alone)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.active = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 in self.steps

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False


class InjectInfGrad(_callback_base()):
    """One gradient entry becomes Inf right before the optimizer step (the loss stays finite)."""

    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")


class PoisonWeight(_callback_base()):
    """A trainable weight becomes NaN right after the optimizer step `step` (its loss and gradients
    were finite): only the check before publishing a checkpoint can catch it."""

    def __init__(self, step):
        self.step = step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            import torch

            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class Snapshot(_callback_base()):
    """The trainable weights as training left them (to check that a refused update changed nothing)."""

    def __init__(self):
        self.weights = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json would accept)."""
    import json

    def refuse(name):
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=refuse)
