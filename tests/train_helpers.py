"""Tiny random Llama + WordLevel tokenizer + small q/a files for CPU training tests (seconds).

`tiny_project(root)` saves the model with its tokenizer (a chat template whose assistant turns end in
<eot>) and writes the data files beside it; `run_config` trains on them through the real tokenizer
and data layers: rows read, split, templated and masked exactly as for a user's run.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llamaft.config import config_from_dict

VOCAB = 64
# Prompt words, then the answer and <eot> (id 3, the turn end the tokenizer rules find in the template).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }} <eot> "
            "{% else %}{{ m['content'] }} {% endif %}{% endfor %}")


@dataclass
class Rules:  # same fields as llamaft.model.tokenizer.TokenRules (the parts model loading reads)
    pad_id: int = 0
    eos_id: int = 1
    stop_ids: list = field(default_factory=lambda: [1, 3])
    turn_end_ids: list = field(default_factory=lambda: [3])
    family: str = "other"
    instruct: bool = False
    chat_template: str | None = None
    template_kwargs: dict = field(default_factory=dict)
    added_tokens: list = field(default_factory=list)  # tokens the tokenizer layer added (e.g. <|pad|>)


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


def chat_tokenizer():
    """tokenizer() with TEMPLATE as its chat template and <eot> a special token (still 64 ids)."""
    t = tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    t.chat_template = TEMPLATE
    return t


@contextmanager
def one_torch_thread():
    """Tiny matmuls on a shared 2-core CPU: extra threads only contend (2 threads ~50x slower than 1).
    The fixture `one_thread` (conftest.py) for a test; this for a module- or session-wide fixture."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_model_dir(root: Path) -> Path:
    """root/tiny-llama: a random 2-layer Llama over 64 ids, saved with chat_tokenizer()."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    out = root / "tiny-llama"
    model.save_pretrained(out)
    chat_tokenizer().save_pretrained(out)
    return out


def qa_rows(n: int, seed: int) -> list[dict]:
    """Questions of 3-9 words, answers of 1-3 words from a small set (so a few steps learn them)."""
    rng = random.Random(seed)
    word = lambda lo, hi: f"w{rng.randrange(lo, hi)}"
    return [{"question": " ".join(word(10, VOCAB) for _ in range(rng.randint(3, 9))),
             "answer": " ".join(word(4, 10) for _ in range(rng.randint(1, 3)))} for _ in range(n)]


def tiny_project(root: Path) -> Path:
    """tiny_model_dir(root) plus root/data: train.jsonl (32 rows) and the validation sets alpha.jsonl
    (8 rows) and b_set.jsonl (6 rows). Returns the model directory (run_config finds the data)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 32, 1), ("alpha", 8, 2), ("b_set", 6, 3)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(n, seed)), encoding="utf-8")
    return tiny_model_dir(root)


def run_config(model_dir: Path, out_dir: Path, **train) -> object:
    """A LoRA run on tiny_project's model and data (the data files sit beside the model directory)."""
    data = Path(model_dir).parent / "data"
    raw = {
        "model": {"name": str(model_dir), "method": train.pop("method", "lora")},
        "lora": {"r": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0)},
        "data": {"train": [str(data / "train.jsonl")],
                 "validation": {"alpha": str(data / "alpha.jsonl"), "b_set": str(data / "b_set.jsonl")}},
        "train": {"output_dir": str(out_dir), "max_steps": 8, "micro_batch_size": 4, "gradient_accumulation": 2,
                  "learning_rate": 1e-2, "save_every": 3, "eval_every": 0.25, "logging_every": 1,
                  "save_total_limit": 2, **train},
        "fast": {"enabled": False},
    }
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# `llamaft train` in a child process (exit codes, stderr, SIGKILL): real tokenizer/data modules on a
# tiny byte-level Llama, no monkeypatching across the process boundary.


def cli_project(root: Path, **train) -> Path:
    """A base model dir, 24 q/a rows and a run config under root; returns the config path.
    `train` entries override the config's train section (run dir: root/run)."""
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
    """One gradient entry becomes Inf as the backward of optimizer step `step` (1-based) completes it
    (the loss stays finite): before the Trainer measures the norm, as a real overflow would be."""

    def __init__(self, step):
        self.step = step
        self.active = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def poison(p):
            if self.active:
                p.grad.view(-1)[0] = float("inf")

        next(p for p in model.parameters() if p.requires_grad).register_post_accumulate_grad_hook(poison)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False


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
    def refuse(name):
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=refuse)
