"""The tiny sweep project of tests/sweep/: a tiny random Llama on a task where the learning rate matters
visibly (every answer is the same three words: full fine-tuning at lr 0.1 learns it in 8 steps, eval
loss ~0.5; 1e-4 does not move, ~4.16 = ln 64; 10 blows up, ~1000), a spec file, the study read back."""

import json
from pathlib import Path

import yaml

from train_helpers import tiny_model_dir

ROWS = {"train": 16, "alpha": 4, "b_set": 4}


def _project(root: Path, **train) -> Path:
    """A tiny model, constant-answer q/a files and base.yaml (full fine-tuning, 8 steps, eval every 2)."""
    model = tiny_model_dir(root)
    for name, n in ROWS.items():
        rows = [{"question": " ".join(f"w{(7 * i + j) % 50 + 10}" for j in range(4)), "answer": "w5 w6 w7"}
                for i in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"model": {"name": str(model), "method": "full"},
            "data": {"train": [str(root / "train.jsonl")],
                     "validation": {"alpha": str(root / "alpha.jsonl"), "b_set": str(root / "b_set.jsonl")}},
            "train": {"output_dir": str(root / "run"), "max_steps": 8, "micro_batch_size": 4, "gradient_accumulation": 2,
                      "scheduler": "constant", "save_every": 0, "eval_every": 2, "report_to": [], **train},
            "fast": {"enabled": False}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root / "base.yaml"


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump({"sweep": spec}))
    return path


def _trials(sweep: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name="llamaft-sweep", storage=f"sqlite:///{sweep / 'study.db'}").get_trials()
