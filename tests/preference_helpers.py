"""Tiny preference projects for CPU tests: concise answers (1-2 words of w4-w9) preferred to rambling
ones (4-6 words of w10-w20), on tiny_project's random 2-layer Llama and WordLevel tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llamaft.config import config_from_dict
from train_helpers import VOCAB, tiny_model_dir


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = lambda lo, hi, k: " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(k))
    return [{"prompt": words(21, VOCAB, rng.randint(3, 6)), "chosen": words(4, 10, rng.randint(1, 2)),
             "rejected": words(10, 21, rng.randint(4, 6))} for _ in range(n)]


def preference_project(root: Path) -> Path:
    """root/tiny-llama + root/data/{train,val}.jsonl (48 and 16 pairs); returns the model directory."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 48, 1), ("val", 16, 2)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(n, seed)), encoding="utf-8")
    return tiny_model_dir(root)


def preference_config(model_dir: Path, out_dir: Path, objective: str = "dpo", **train):
    data = Path(model_dir).parent / "data"
    dpo = train.pop("dpo", {})
    raw = {
        "model": {"name": str(model_dir), "method": train.pop("method", "lora")},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [str(data / "train.jsonl")], "validation": {"val": str(data / "val.jsonl")}},
        "train": {"output_dir": str(out_dir), "objective": objective, "max_steps": 12, "micro_batch_size": 8,
                  "learning_rate": 2e-2, "scheduler": "constant", "save_every": 6, "eval_every": 6,
                  "logging_every": 1, "report_to": [], **train},
        "dpo": dpo,
        "fast": {"enabled": False},
    }
    return config_from_dict(raw)


def model_spy(event: str = "on_train_end"):
    """A Trainer callback that records the model the recipe built (`spy.models`) at `event`, to look at
    its adapters and reference."""
    from transformers import TrainerCallback

    def record(self, args, state, control, model=None, **kwargs):
        self.models.append(model)

    spy = type("ModelSpy", (TrainerCallback,), {event: record})()
    spy.models = []
    return spy
