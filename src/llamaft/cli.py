"""The `llamaft` command: a table of command -> function.

    llamaft demo
    llamaft train configs/llama-3.1-8b-lora.yaml lora.r=32 train.learning_rate=2e-4
    llamaft data configs/demo.yaml --dump examples.jsonl
    llamaft eval runs/demo --compare-base
    llamaft merge runs/demo --out runs/demo/merged
    llamaft export runs/demo --format gguf --quant q8_0
    llamaft chat runs/demo

Every command validates its inputs before loading a model. Problems the user can fix are
`LlamaftError`s: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import LlamaftError

# Heavy imports (torch, transformers) happen inside the command functions, so `--help` is instant.


def _load(a: argparse.Namespace):
    """Config + overrides, with `model.name: embedded:smollm2` resolved to the cached demo model."""
    from .assets import resolve_model_name
    from .config import load_config

    cfg = load_config(a.config, a.overrides)
    cfg.model.name = resolve_model_name(cfg.model.name)
    return cfg


def _cmd_demo(a: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out_dir=a.out, steps=a.steps, chat=not a.no_chat, export=not a.no_export)


def _cmd_train(a: argparse.Namespace) -> None:
    from .train import train

    cfg = _load(a)
    run_dir = train(cfg)
    print(f"run directory: {run_dir}")


def _cmd_data(a: argparse.Namespace) -> None:
    from .data.inspect import inspect_data

    cfg = _load(a)
    inspect_data(cfg, show=a.show, dump=a.dump)


def _cmd_eval(a: argparse.Namespace) -> None:
    from .eval.evaluate import evaluate_run

    evaluate_run(a.path, data=a.data, compare_base=a.compare_base, out=a.out, max_samples=a.max_samples)


def _cmd_merge(a: argparse.Namespace) -> None:
    from .export.merge import merge

    out = merge(a.run_dir, a.out, dtype=a.dtype, overwrite=a.overwrite)
    print(f"merged model: {out}")


def _cmd_export(a: argparse.Namespace) -> None:
    from .export.cli import export_command

    export_command(a)


def _cmd_chat(a: argparse.Namespace) -> None:
    if a.ui:
        from .chat.ui import launch_ui, resolve_auth

        from .chat.generate import GenParams

        params = GenParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                           max_new_tokens=a.max_new_tokens, repetition_penalty=a.repetition_penalty)
        auth = resolve_auth(a.auth, a.auth_file)  # --auth, else --auth-file, else $LLAMAFT_UI_AUTH
        launch_ui(a.path, host=a.host, port=a.port, auth=auth, base=a.base, system=a.system, params=params)
        return
    if a.path.endswith(".gguf"):
        from .chat.gguf_backend import chat_loop_gguf

        chat_loop_gguf(a.path, system=a.system, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens)
        return
    from .chat.terminal import chat_loop

    chat_loop(a.path, system=a.system, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
              top_k=a.top_k, repetition_penalty=a.repetition_penalty)


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=32 train.learning_rate=2e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaft", description="Fine-tune Llama 3 / 3.1 models: LoRA, QLoRA, full.")
    parser.add_argument("--version", action="version", version=f"llamaft {__import__('llamaft').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    table: dict[str, Callable] = {}

    def command(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        table[name] = fn
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = command("demo", _cmd_demo, "Offline demo: LoRA-tune the embedded SmolLM2-135M-Instruct on a bundled task, "
                "evaluate before/after, merge, export and chat (a few minutes on CPU).")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    p.add_argument("--no-chat", action="store_true", help="skip the closing chat sample")
    p.add_argument("--no-export", action="store_true", help="skip the GGUF export")

    p = command("train", _cmd_train, "Fine-tune from a YAML config (+ dotted key=value overrides).")
    _overrides(p)

    p = command("data", _cmd_data, "Show what will be trained: rendered examples with trained spans marked, "
                "token-length statistics, truncated/dropped rows; --dump writes the exact token ids and labels.")
    _overrides(p)
    p.add_argument("--show", type=int, default=3, help="examples to render (default 3)")
    p.add_argument("--dump", metavar="FILE.jsonl", help='write {"input_ids": [...], "labels": [...]} per training example, in trainer order')

    p = command("eval", _cmd_eval, "Evaluate a run (adapter or merged model): loss + generation metrics, predictions.jsonl.")
    p.add_argument("path", help="run directory or merged model directory")
    p.add_argument("--data", help="test file (default: the run's test split, else its validation sets)")
    p.add_argument("--compare-base", action="store_true", help="also run the base model on the same rows, side by side")
    p.add_argument("--out", help="where to write predictions (default: RUN/eval)")
    p.add_argument("--max-samples", type=int, default=None, help="rows to generate for (default: all)")

    p = command("merge", _cmd_merge, "Merge a run's adapter into its base: one 16-bit safetensors model directory.")
    p.add_argument("run_dir", help="run directory written by `llamaft train`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = command("export", _cmd_export, "Export a run or model: merged HF safetensors or GGUF (self-checked in llama.cpp).")
    p.add_argument("path", help="run directory or model directory")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--out", help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="hf: weights dtype")
    p.add_argument("--max-shard-size", default="5GB", help="hf: shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quant", default="f16", help="gguf: f16, bf16, q8_0, q4_0 (q4_k_m etc. need llama-quantize on PATH)")
    p.add_argument("--ollama", action="store_true", help="gguf: write an Ollama Modelfile beside it")
    p.add_argument("--no-check", action="store_true", help="gguf: skip the llama.cpp self-check")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the result to the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: private repository")

    p = command("chat", _cmd_chat, "Chat with a run, a model directory or a .gguf file (terminal, or --ui for a web app).")
    p.add_argument("path", help="run directory, model directory or .gguf file")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--ui", action="store_true", help="web UI (Gradio) instead of the terminal")
    p.add_argument("--host", default="127.0.0.1", help="--ui: bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="--ui: port")
    p.add_argument("--auth-file", metavar="FILE", help="--ui: file with one user:pass line (chmod 600) required to open "
                   "the page; or set LLAMAFT_UI_AUTH=user:pass")
    p.add_argument("--auth", metavar="USER:PASS", help="--ui: like --auth-file, but the password shows in the process "
                   "list (ps) to every user; prints a warning")
    p.add_argument("--base", nargs="?", const=True, default=False, metavar="PATH",
                   help="--ui: side-by-side with the base model (a run's own base by default; PATH for a merged or other model)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except LlamaftError as err:
        print(f"llamaft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or unwritable place that no command anticipated: still one line
        from .paths import ENVIRONMENT_ERRNOS, reason

        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"llamaft {args.command}: error: {err.filename or 'write'}: {reason(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
