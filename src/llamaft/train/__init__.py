"""Training: one path for LoRA, QLoRA and full fine-tuning on the HF Trainer. See recipe.py.

`train` is imported on first use: `llamaft train --nproc N` starts its processes (launch.py) without
loading the recipe's libraries first (seconds each process would then repeat).
"""

__all__ = ["train"]


def __getattr__(name: str):
    if name == "train":
        from .recipe import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
