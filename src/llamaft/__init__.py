"""llamaft: correct, fast fine-tuning of Llama 3 / 3.1 models."""

__version__ = "0.1.0"
