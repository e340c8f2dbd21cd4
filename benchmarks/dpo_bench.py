"""Plain TRL DPO vs llamaft DPO (LoRA) on a random Llama of 8B shape: tokens/s, device memory, losses.

    python benchmarks/dpo_bench.py --out benchmarks/results/dpo_bench_h200.json            # 8B shape, GPU
    python benchmarks/dpo_bench.py --layers 1 --hidden 16 --inter 32 --heads 2 --kv-heads 1 --steps 2 --pairs 4 --batch 2 \
        --prompt-words 6 --answer-words 3 --packing on --out /tmp/dpo_dry.json   # CPU dry run (~40 s; not in the test suite)

Every tool gets the same random model directory (Llama 3.1 tokenizer and chat template), the same
conversational pairs, LoRA r=16 on every linear layer, the same batch, steps, learning rate and
precision. "trl" is TRL's DPOTrainer given the dataset and a peft_config (TRL tokenizes);
"llamaft" is `llamaft train` with train.objective=dpo and fast.preference_packing=--packing (our
tokens, TRL's loss; auto packs the pairs where the fast path runs, i.e. on the GPU);
"llamaft_padded" the same with fast.preference_packing=off (TRL's padded pairs). Per tool:
tokens/s (real tokens of both sequences of every pair, measured after the first step), the
device's peak allocated memory, the losses of every step and, for llamaft, the plan's reason
lines (`fast_path`: whether the pairs were packed, with which attention). No speedup is claimed by
this script: it measures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_model_dir(root: Path, a) -> Path:
    """A random Llama of the given shape with the Llama 3.1 tokenizer and chat template, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaft.model.tokenizer import llama3_tokenizer, template_text

    tok = llama3_tokenizer("3.1")
    tok.chat_template = template_text("llama3.1")
    tok.pad_token = "<|finetune_right_pad_id|>"
    cfg = LlamaConfig(vocab_size=128256, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def pairs(n: int, prompt_words: int, answer_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]) for _ in range(k))
    return [{"prompt": [{"role": "user", "content": words(prompt_words)}],
             "chosen": [{"role": "assistant", "content": words(answer_words)}],
             "rejected": [{"role": "assistant", "content": words(answer_words + 7)}]} for _ in range(n)]


class _Meter:
    """Trainer callback: wall time per step after the first, and the losses."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Meter(TrainerCallback):
            def __init__(self):
                self.t0, self.losses, self.tokens0 = None, [], 0

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    self.t0 = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])
                if logs and state.global_step == 1 and "num_tokens" in logs:
                    self.tokens0 = logs["num_tokens"]

        return Meter()


def run_trl(model_dir: Path, rows: list[dict], a, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=a.lr, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=cuda, logging_steps=1,
                     report_to=[], save_strategy="no", max_length=None, beta=0.1, lr_scheduler_type="constant",
                     model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
    meter = _Meter()
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[meter],
                         peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = time.perf_counter() - meter.t0
    tokens = trainer._total_train_tokens - meter.tokens0
    return {"tokens_per_s": tokens / seconds if seconds > 0 else None, "losses": meter.losses,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run_llamaft(model_dir: Path, rows: list[dict], a, work: Path, packing: str | None = None) -> dict:
    import torch

    from llamaft.config import config_from_dict
    from llamaft.train import train

    packing = packing or a.packing
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cuda = torch.cuda.is_available()
    cfg = config_from_dict({
        "model": {"name": str(model_dir), "method": "lora"}, "lora": {"r": 16, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": [str(data)], "val_ratio": 0.0, "max_seq_length": 8192},
        "train": {"output_dir": str(work / f"llamaft_{packing}"), "objective": "dpo", "max_steps": a.steps, "micro_batch_size": a.batch,
                  "learning_rate": a.lr, "scheduler": "constant", "save_every": 0, "eval_every": 0, "logging_every": 1,
                  "report_to": [], "gradient_checkpointing": "on" if cuda else "off"},
        "dpo": {"beta": 0.1},
        "fast": {"preference_packing": packing},
    })
    meter = _Meter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = train(cfg, callbacks=[meter])
    summary = json.loads((Path(run) / "summary.json").read_text())
    return {"tokens_per_s": (summary.get("throughput") or {}).get("tokens_per_s"), "losses": meter.losses,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "fast_path": summary.get("fast_path")}


def run_llamaft_padded(model_dir: Path, rows: list[dict], a, work: Path) -> dict:
    return run_llamaft(model_dir, rows, a, work, packing="off")


TOOLS = {"trl": run_trl, "llamaft": run_llamaft, "llamaft_padded": run_llamaft_padded}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", default="trl,llamaft,llamaft_padded", help=f"comma-separated, of {', '.join(TOOLS)}")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="fast.preference_packing of the 'llamaft' tool (auto: packed pairs on the GPU)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="pairs per step (each pair: two sequences)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--prompt-words", type=int, default=300)
    p.add_argument("--answer-words", type=int, default=300)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = pairs(a.pairs, a.prompt_words, a.answer_words)
    result = {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "inter", "heads", "kv_heads")},
              "batch_pairs": a.batch, "steps": a.steps, "tools": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work, a)
        for tool in a.tools.split(","):
            result["tools"][tool] = TOOLS[tool](model_dir, rows, a, work)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
