"""The `llamaft` command: a table of command -> (function, help, options).

    llamaft demo
    llamaft train configs/llama-3.1-8b-lora.yaml lora.r=32 train.learning_rate=2e-4
    llamaft train configs/llama-3.1-8b-lora.yaml --nproc 2     # two processes (DDP or FSDP2; gloo on CPU)
    llamaft data configs/llama-3.1-8b-lora.yaml --dump examples.jsonl
    llamaft eval runs/demo --compare-base
    llamaft merge runs/demo --out runs/demo/merged
    llamaft export runs/demo --format gguf --quant q8_0
    llamaft chat runs/demo

Overrides (`section.key=value`) may come anywhere on the line, also after options. Every command
validates its inputs before loading a model. Problems the user can fix are `LlamaftError`s (and
argparse usage errors): printed as one line, no traceback. Exit codes: 0 done, 2 bad input (config,
data, paths, non-finite weights to merge/export), 3 training stopped because the loss or gradients
were not finite (diverged), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

To add a command: a `_cmd_NAME(args)` function, a `_NAME_args(parser)` that declares its options,
and one row in `commands()`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .errors import LlamaftError

# Heavy imports (torch, transformers) happen inside the command functions, so `--help` is instant.

# ---------------------------------------------------------------------------------------------
# The commands: one function each, called with the parsed arguments


def _load(a: argparse.Namespace):
    """Config + overrides, with `model.name: embedded:smollm2` resolved to the cached demo model."""
    from .assets import resolve_model_name
    from .config import load_config

    cfg = load_config(a.config, a.overrides)
    # Several processes: each machine's first one prepares the embedded model, the others only need
    # its path (they load it after rank 0 has checked it).
    cfg.model.name = resolve_model_name(cfg.model.name, prepare=os.environ.get("LOCAL_RANK", "0") == "0")
    return cfg


def _cmd_demo(a: argparse.Namespace) -> None:
    if a.dpo:
        from .demo_dpo import run_dpo_demo

        run_dpo_demo(out_dir=a.out or "runs/demo-dpo", steps=a.steps)
        return
    from .demo import run_demo

    run_demo(out_dir=a.out or "runs/demo", steps=a.steps, chat=not a.no_chat, export=not a.no_export)


def _cmd_train(a: argparse.Namespace) -> int | None:
    from .train import train
    from .train.distributed import check
    from .train.launch import launch, processes

    cfg = _load(a)
    n = processes(a.nproc)
    if n > 1:
        check(cfg, n)  # a batch that does not divide among them: one line here, before n processes start
        return launch(["train", a.config, *a.overrides], n)
    run_dir = train(cfg)
    if _rank() == 0:
        print(f"run directory: {run_dir}")
    return None


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _cmd_sweep(a: argparse.Namespace) -> None:
    from .sweep.command import sweep_command

    sweep_command(a)


def _cmd_data(a: argparse.Namespace) -> None:
    from .data.inspect import inspect_data
    from .model.tokenizer import load_tokenizer

    cfg = _load(a)
    inspect_data(cfg, load_tokenizer, show=a.show, dump=a.dump)


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
    """Web UI (--ui), llama.cpp for a .gguf file, else the terminal chat over transformers."""
    sampling = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens,
                    repetition_penalty=a.repetition_penalty)
    if a.ui:
        from .chat.ui import launch_ui
        from .chat.ui_auth import resolve_auth
        from .model.generate import GenParams

        auth = resolve_auth(a.auth, a.auth_file)  # --auth, else --auth-file, else $LLAMAFT_UI_AUTH
        launch_ui(a.path, host=a.host, port=a.port, auth=auth, base=a.base, system=a.system, params=GenParams(**sampling))
    elif a.path.endswith(".gguf"):
        from .chat.gguf_backend import chat_loop_gguf

        chat_loop_gguf(a.path, system=a.system, **sampling)
    else:
        from .chat.terminal import chat_loop

        chat_loop(a.path, system=a.system, **sampling)


# ---------------------------------------------------------------------------------------------
# Each command's options


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--nproc", type=_count, default=None, metavar="N",
                   help="processes to train in (DDP or FSDP2: distributed.strategy; gloo on CPU): the same command "
                        "through torch.distributed.run, "
                        "the configured batch shared out among them (default: every visible GPU when there are several, "
                        "else 1; under torchrun / accelerate launch: the processes they started)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/); model.name: a hub id, a local directory, a .gguf "
                                  "file, embedded:smollm2 (the bundled SmolLM2-135M-Instruct: try your data on a CPU), "
                                  "or a llamaft run directory (e.g. an SFT run to start DPO from; model.from_run)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="dotted overrides, anywhere on the line, e.g. lora.r=32 train.learning_rate=2e-4 data.packing=on")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run config YAML (the base of every trial), then SWEEP.yaml unless the "
                                             "config has a sweep: section")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted overrides of the base config")
    p.add_argument("--out", help="sweep directory (default: sweep.output_dir, else train.output_dir + '-sweep')")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR: finished trials are kept, interrupted "
                                                   "ones run again")
    p.add_argument("--workers", type=_count, default=None, metavar="N",
                   help="trials at a time, one worker process per GPU or per group of sweep.gpus_per_trial GPUs (default: "
                        "sweep.workers, auto = as many as the visible GPUs make; 1 on CPU)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run directory (default: runs/demo, with --dpo runs/demo-dpo); a previous demo run there is replaced, any other directory is refused")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    p.add_argument("--no-chat", action="store_true", help="skip the closing chat sample")
    p.add_argument("--no-export", action="store_true", help="skip the GGUF export")
    p.add_argument("--dpo", action="store_true", help="preference alignment instead: DPO teaches SmolLM2 to prefer concise "
                   "answers to rambling ones (validation preference accuracy, then base vs tuned answers)")


def _data_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--show", type=_count, default=3, help="examples to render (default 3; 0 = none)")
    p.add_argument("--dump", metavar="FILE.jsonl", help='write {"input_ids": [...], "labels": [...]} per training example, in trainer order')


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or merged model directory")
    p.add_argument("--data", nargs="+", metavar="FILE", help="test file(s), each a set named by its stem (default: the run's "
                   "test split, else its validation sets, from the copies in RUN/data/)")
    p.add_argument("--compare-base", action="store_true", help="also run the base model on the same rows, side by side")
    p.add_argument("--out", help="where to write predictions (default: RUN/eval)")
    p.add_argument("--max-samples", type=int, default=None, help="rows to generate for (default: all)")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `llamaft train`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _export_args(p: argparse.ArgumentParser) -> None:
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


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory, model directory or .gguf file")
    p.add_argument("--system", help="system prompt (default: the one the run trained with, data.system_prompt; --system '' for none)")
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


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int | None]  # called with the parsed arguments; an int: the exit code
    help: str                                     # one line in `llamaft --help`, the description in `llamaft CMD --help`
    options: Callable[[argparse.ArgumentParser], None]  # declares the command's arguments
    epilog: str | None = None


TRAIN_EXIT_CODES = (
    "exit codes: 0 trained (or the run was already complete: nothing to do); 2 bad config, data or "
    "paths; 3 stopped because the loss or gradients were not finite (train.on_nonfinite), nothing "
    "after the last good checkpoint saved; 130 interrupted / 143 terminated by SIGTERM (resume with train.resume=true). "
    "With --nproc: the code of the process that failed first (128 + N: it was killed by signal N)."
)


SWEEP_SPEC = (
    "spec (SWEEP.yaml or a sweep: section): objective: eval/<set>/<metric> [min|max]; method: tpe | random | grid; "
    "trials: N; timeout: 2h; pruner: median | halving | none; workers: auto; gpus_per_trial: N (processes per trial, "
    "as train --nproc N); space: {train.learning_rate: {log_uniform: [1e-5, 5e-4]}, "
    "lora.r: [8, 16, 32], lora.alpha: {factor_of: lora.r, values: [1, 2]}}. Exit codes: 0 done; 2 bad config, spec or data "
    "(one line, nothing trained); 130 / 143 interrupted (continue with --resume DIR)."
)


def commands() -> dict[str, Command]:
    """Every command, in `--help` order. Built when called (not at import), so it always holds this
    module's current functions (a test may replace one)."""
    return {
        "demo": Command(_cmd_demo, "Offline demo: LoRA-tune the embedded SmolLM2-135M-Instruct (model.name: embedded:smollm2) "
                        "to answer table bookings as JSON, evaluate base vs tuned, merge, export and chat "
                        "(about 3 minutes on a 2-core CPU).", _demo_args),
        "train": Command(_cmd_train, "Fine-tune from a YAML config (+ dotted key=value overrides).", _train_args,
                         epilog=TRAIN_EXIT_CODES),
        "sweep": Command(_cmd_sweep, "Hyperparameter sweep on Optuna: trains a trial per sampled config (TPE, random or "
                         "grid; pruned early when worse than the others), ranks them; results.md, best.yaml, report.md.",
                         _sweep_args, epilog=SWEEP_SPEC),
        "data": Command(_cmd_data, "Show what will be trained: rendered examples with trained spans marked, "
                        "token-length statistics, truncated/dropped rows; --dump writes the exact token ids and labels.",
                        _data_args),
        "eval": Command(_cmd_eval, "Evaluate a run (adapter or merged model): loss + generation metrics, predictions.jsonl.",
                        _eval_args),
        "merge": Command(_cmd_merge, "Merge a run's adapter into its base: one 16-bit safetensors model directory.",
                         _merge_args),
        "export": Command(_cmd_export, "Export a run or model: merged HF safetensors or GGUF (self-checked in llama.cpp).",
                          _export_args),
        "chat": Command(_cmd_chat, "Chat with a run, a model directory or a .gguf file (terminal, or --ui for a web app).",
                        _chat_args),
    }


# ---------------------------------------------------------------------------------------------
# Parsing and running


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (`llamaft CMD: error: ...`, exit 2), like every other llamaft error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The `llamaft` parser: one subcommand per row of the table (default: `commands()`)."""
    parser = _Parser(prog="llamaft", description="Fine-tune Llama 3 / 3.1 models: LoRA, QLoRA, full.")
    parser.add_argument("--version", action="version", version=f"llamaft {__import__('llamaft').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, cmd in (table or commands()).items():
        cmd.options(sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=cmd.epilog))
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may come anywhere, also after options
    (`llamaft data cfg.yaml --dump x.jsonl data.max_seq_length=64`). argparse's own
    parse_intermixed_args does not support subcommands, so leftovers are collected here."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [x for x in extra if not (takes_overrides and "=" in x and not x.startswith("-"))]
    if unknown:
        prog = f"{parser.prog} {args.command}"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see `{prog} --help`)\n")
    if extra:
        args.overrides = [*args.overrides, *extra]
    config = getattr(args, "config", None)
    if config and "=" in config and not os.path.exists(config):
        # overrides before the config file (`llamaft train lora.r=32 run.yaml`): the first word without '=' is the file
        files = [x for x in args.overrides if "=" not in x]
        if files:
            rest = [config, *args.overrides]
            rest.remove(files[0])
            args.config, args.overrides = files[0], rest
    return args


def main(argv: list[str] | None = None) -> int:
    table = commands()
    try:
        args = _parse(build_parser(table), argv)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2, one line already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .console import quiet_libraries

    quiet_libraries()  # after parsing: --help and --version stay instant (it imports transformers' logging)
    try:
        with _stop_on_sigterm():
            code = table[args.command].run(args)
    except LlamaftError as err:
        if not err.quiet:  # quiet: another process of the same run printed it
            print(f"llamaft {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk or unwritable place that no command anticipated: still one line
        from .paths import ENVIRONMENT_ERRNOS, reason

        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"llamaft {args.command}: error: {err.filename or 'write'}: {reason(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if _rank() == 0:  # several processes: each got the signal; one line
            print("terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    return code or 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`, `docker stop`): stopped like Ctrl-C, so a training
    run writes its summary ("interrupted") and keeps its complete checkpoints, and merge/export remove
    what they staged, instead of the process dying mid-write."""


@contextmanager
def _stop_on_sigterm():
    """SIGTERM raises Terminated while a command runs; the previous handler is back afterwards (main()
    is also called in-process, by tests and by Python users)."""
    def handler(_signum, _frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
