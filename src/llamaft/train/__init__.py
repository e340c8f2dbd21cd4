"""Training: one path for LoRA, QLoRA and full fine-tuning on the HF Trainer. See recipe.py."""

from .recipe import train

__all__ = ["train"]
