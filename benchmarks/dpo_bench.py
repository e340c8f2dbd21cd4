"""Plain TRL DPO vs llamaft DPO (LoRA) on a random Llama of 8B shape: tokens/s, device memory, losses.

    python benchmarks/dpo_bench.py --out benchmarks/results/dpo_bench_h200.json            # 8B shape, GPU
    python benchmarks/dpo_bench.py --vary --tools trl,llamaft --out ...                    # mixed lengths
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

Each tool runs in its own process (a fresh CUDA context), so its device-level peak (the driver's
view, sampled every 20 ms by llamaft.train.progress.MemoryPeak from before the model loads, less
what the GPU held before the process started) is its own. Tokens/s for every tool is TRL's own
`num_tokens` count (real tokens of both sequences of every pair: the attention mask's sum, which the
packed path hands TRL in the padded layout) over the wall time between the end of step 1 and the
end of the last step, from the same callback. --vary draws each pair's prompt and answer lengths
uniformly around the given means (real preference data is mixed; padded pairs pay for the longest
sequence of the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
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


def pairs(n: int, prompt_words: int, answer_words: int, seed: int = 0, vary: bool = False) -> list[dict]:
    """n conversational pairs; the rejected answer 7 words longer. vary: lengths uniform in
    [mean/6, 11*mean/6] (same means), else every pair the same length."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]) for _ in range(k))
    size = (lambda m: rng.randint(max(1, m // 6), max(1, 11 * m // 6))) if vary else (lambda m: m)
    out = []
    for _ in range(n):
        answer = size(answer_words)
        out.append({"prompt": [{"role": "user", "content": words(size(prompt_words))}],
                    "chosen": [{"role": "assistant", "content": words(answer)}],
                    "rejected": [{"role": "assistant", "content": words(answer + 7)}]})
    return out


class _Meter:
    """Trainer callback: wall time from the end of step 1 to the end of the last step, TRL's num_tokens
    logged at those two steps, the losses."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Meter(TrainerCallback):
            def __init__(self):
                self.t0 = self.t1 = None
                self.losses, self.tokens = [], {}

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    self.t0 = time.perf_counter()
                self.t1 = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])
                if logs and "num_tokens" in logs:
                    self.tokens[state.global_step] = logs["num_tokens"]

            def result(self) -> dict:
                seconds = (self.t1 or 0) - (self.t0 or 0)
                steps = sorted(self.tokens)
                tokens = self.tokens[steps[-1]] - self.tokens.get(1, 0) if steps else 0
                return {"tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
                        "timed_tokens": tokens, "timed_seconds": round(seconds, 3),
                        "timed_steps": (steps[-1] - 1) if steps else 0, "losses": self.losses}

        return Meter()


def run_trl(model_dir: Path, rows: list[dict], a, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=a.lr, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=cuda and a.gc != "off", logging_steps=1,
                     report_to=[], save_strategy="no", max_length=None, beta=0.1, lr_scheduler_type="constant",
                     model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
    meter = _Meter()
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[meter],
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return meter.result()


def run_llamaft(model_dir: Path, rows: list[dict], a, work: Path, packing: str | None = None) -> dict:
    import torch

    from llamaft.config import config_from_dict
    from llamaft.train import train

    packing = packing or a.packing
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cuda = torch.cuda.is_available()
    cfg = config_from_dict({
        "model": {"name": str(model_dir), "method": "lora"}, "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [str(data)], "val_ratio": 0.0, "max_seq_length": 8192},
        "train": {"output_dir": str(work / f"llamaft_{packing}"), "objective": "dpo", "max_steps": a.steps, "micro_batch_size": a.batch,
                  "learning_rate": a.lr, "scheduler": "constant", "save_every": 0, "eval_every": 0, "logging_every": 1,
                  "report_to": [], "gradient_checkpointing": a.gc if cuda else "off"},
        "dpo": {"beta": 0.1},
        "fast": {"preference_packing": packing, "compile": a.compile, "offload_checkpoints": a.offload},
    })
    meter = _Meter()
    run = train(cfg, callbacks=[meter])
    summary = json.loads((Path(run) / "summary.json").read_text())
    return dict(meter.result(), fast_path=summary.get("fast_path"), llamaft_throughput=summary.get("throughput"))


def run_llamaft_padded(model_dir: Path, rows: list[dict], a, work: Path) -> dict:
    return run_llamaft(model_dir, rows, a, work, packing="off")


TOOLS = {"trl": run_trl, "llamaft": run_llamaft, "llamaft_padded": run_llamaft_padded}


def run_one(a) -> dict:
    """One tool in this process: its numbers and the device peak (see the module doc)."""
    import torch

    rows = pairs(a.pairs, a.prompt_words, a.answer_words, vary=a.vary)
    cuda = torch.cuda.is_available()
    before = None
    if cuda:
        from llamaft.train.progress import MemoryPeak

        free, total = torch.cuda.mem_get_info()
        before = total - free  # this process's context and whatever else holds the GPU
        peak = MemoryPeak("cuda", interval=0.02)
        peak.start()
    with tempfile.TemporaryDirectory() as tmp:
        out = TOOLS[a.only](Path(a.model_dir), rows, a, Path(tmp))
    if cuda:
        peak.stop()
        out.update(device_peak_gib=round((peak.peak_bytes - before) / 2**30, 2),
                   torch_allocated_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   torch_reserved_peak_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", default="trl,llamaft,llamaft_padded", help=f"comma-separated, of {', '.join(TOOLS)}")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="fast.preference_packing of the 'llamaft' tool (auto: packed pairs on the GPU)")
    p.add_argument("--gc", default="on", choices=["auto", "on", "off"],
                   help="llamaft's train.gradient_checkpointing on the GPU; off also turns TRL's off (each tool at its fastest)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="llamaft's fast.compile")
    p.add_argument("--offload", default="auto", choices=["auto", "on", "off"], help="llamaft's fast.offload_checkpoints")
    p.add_argument("--vary", action="store_true", help="mixed pair lengths around the means (module doc)")
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
    p.add_argument("--model-dir", default=None, help="reuse this saved model (default: make one in a temporary directory)")
    p.add_argument("--only", default=None, choices=list(TOOLS), help=argparse.SUPPRESS)  # one tool, in this process
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.only:
        out = run_one(a)
        Path(a.out).write_text(json.dumps(out, indent=2))
        return out
    argv = list(sys.argv[1:] if argv is None else argv)
    result = {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "inter", "heads", "kv_heads")},
              "batch_pairs": a.batch, "steps": a.steps, "vary": a.vary, "gc": a.gc, "compile": a.compile, "offload": a.offload,
              "command": "python benchmarks/dpo_bench.py " + " ".join(argv), "versions": versions(), "tools": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else make_model_dir(Path(tmp), a)
        for tool in a.tools.split(","):
            part = Path(tmp) / f"{tool}.json"
            rc = subprocess.run([sys.executable, __file__, *argv, "--only", tool, "--model-dir", str(model_dir),
                                 "--out", str(part)], env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
            result["tools"][tool] = json.loads(part.read_text()) if rc == 0 and part.exists() else {"failed": rc}
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2))  # after every tool: a later crash keeps these
    print(json.dumps({t: {k: v.get(k) for k in ("tokens_per_s", "device_peak_gib", "torch_allocated_peak_gib", "failed")}
                      for t, v in result["tools"].items()}, indent=2))
    return result


def versions() -> dict:
    """bench.py's version record (with TRL) and the device."""
    import torch

    from bench import versions as package_versions

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(package_versions(("torch", "transformers", "peft", "trl", "accelerate")), device=device)

if __name__ == "__main__":
    main()
