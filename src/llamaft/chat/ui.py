"""Web chat UI: `llamaft chat RUN_DIR|MODEL_DIR|FILE.gguf --ui [--host H] [--port N] [--auth-file FILE]`.

    launch_ui("runs/demo")                          # http://127.0.0.1:7860, blocks until Ctrl-C
    app = build_app("runs/demo", base=True)         # Gradio Blocks (tests start it on a free port)
    serve(app, port=0, block=False); ...; app.close()

Streaming chat through `llamaft.model.generate.stream_chat` (the one generation function that the
terminal chat and evaluation use: the model's chat template and every stop id), an editable system
prompt, the sampling settings, stop / clear / regenerate, a side-by-side mode that sends each prompt to
the base model too, and the run's summary when given a run directory (ui_summary.py).

Where the base model for side-by-side comes from (ui_backends.py, `resolve_models`):
  run dir with a LoRA adapter   the same weights with the adapter switched off (no second copy)
  run dir of a full fine-tune   load_for_inference(run, adapter=False), loaded on first use
  RUN/merged (a model dir inside a run)   that run's base, as above
  any other model dir / .gguf   only with an explicit base=PATH (CLI: --base PATH); otherwise the
                                side-by-side switch is disabled and says why.

Private by default: binds 127.0.0.1; any other host without auth prints a warning. The login comes
from LLAMAFT_UI_AUTH=user:pass or --auth-file FILE (`resolve_auth`); --auth user:pass still works but
is visible to every user in `ps`, so it prints a warning. No share
links, no telemetry (GRADIO_ANALYTICS_ENABLED=False before gradio is imported), no monitoring or
MCP endpoints, and the theme's fonts are the ones gradio ships, so the page loads offline.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

# Before `import gradio`: gradio reads this at import and Blocks() time (version check, usage pings).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from ..errors import LlamaftError  # noqa: E402
from ..model.generate import GenParams  # noqa: E402
from .ui_backends import Models, resolve_models  # noqa: E402
from .ui_summary import run_summary_parts  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CSS = "#status {min-height: 1.6em; opacity: 0.8} footer {display: none !important}"
EMPTY = "_(empty reply: the model stopped at once)_"
CURSOR = " ▌"


def _gradio():
    try:
        import gradio as gr
    except ImportError as exc:  # an optional dependency: the terminal chat works without it
        raise LlamaftError(f"the web UI needs gradio: pip install 'gradio>=6' ({exc})") from None
    return gr


# ---------------------------------------------------------------------------------------------
# Conversation logic, independent of the widgets (tested directly, without a browser)


def new_state() -> dict:
    """Per-browser-session conversations, system prompt excluded (it is read fresh every turn)."""
    return {"tuned": [], "base": [], "active": None}  # active: the conversation being streamed


def view(messages: list[dict], pending: bool = False) -> list[dict]:
    """Chatbot value for one conversation: a cursor on the reply being streamed, a note on an empty
    one, and a label on replies the base column only holds as context (see _sync_base)."""
    out = []
    for m in messages:
        content = m["content"]
        if m.get("context"):
            content = f"_(fine-tuned reply, kept as context)_\n\n{content}"
        out.append({"role": m["role"], "content": content})
    if out and out[-1]["role"] == "assistant":
        if pending:
            out[-1]["content"] += CURSOR
        elif not out[-1]["content"].strip():
            out[-1]["content"] = EMPTY
    return out


def _users(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _sync_base(state: dict) -> None:
    """Side-by-side switched on mid-conversation: the base model gets the conversation so far (the
    fine-tuned replies included), so both models answer the same next prompt in the same context."""
    if _users(state["base"]) != _users(state["tuned"]):
        state["base"] = [dict(m, context=m["role"] == "assistant") for m in state["tuned"]]


def turn(models: Models, state: dict, system: str, side: bool, params: GenParams,
         stop: threading.Event | None = None) -> Iterator[tuple[dict, str]]:
    """Stream replies to the last user message: fine-tuned model first, then (side-by-side) the base.

    Sequential on purpose: on one GPU (or a CPU) two concurrent generations are no faster, and with a
    LoRA run the base is the same weights with the adapter switched off, which must not overlap.
    Yields (state, status) after every text piece; the state holds the partial replies.
    `stop` (the Stop button): checked between pieces; the generation is closed, which cancels the
    model's thread (stream_chat), and a base reply not started yet is not asked for.
    """
    keys = ["tuned", "base"] if side else ["tuned"]
    prefix = [{"role": "system", "content": system}] if system and system.strip() else []
    started = time.time()
    stopped = lambda: stop is not None and stop.is_set()  # noqa: E731
    for key in keys:
        conv = state[key]
        if stopped():
            if conv and conv[-1]["role"] == "user":
                conv.pop()  # unanswered: the next side-by-side turn re-syncs this column (_sync_base)
            break
        backend = models.tuned if key == "tuned" else models.base()
        messages = prefix + [{"role": m["role"], "content": m["content"]} for m in conv]
        conv.append({"role": "assistant", "content": ""})
        state["active"] = key
        yield state, f"generating ({backend.label}) …"
        pieces = backend.stream(messages, params)
        try:
            for piece in pieces:
                if stopped():
                    break
                conv[-1]["content"] += piece
                yield state, f"generating ({backend.label}) …"
        finally:
            state["active"] = None
            if hasattr(pieces, "close"):  # a generator: closing it cancels the model's thread
                pieces.close()
    yield state, f"{'stopped after' if stopped() else 'done in'} {time.time() - started:.1f} s"


class Stops:
    """One stop flag per browser session (gr.Request.session_hash): Stop sets it, the running turn reads it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}

    def fresh(self, session: str) -> threading.Event:
        """A new, unset flag for the turn starting now in this session."""
        flag = self._flags[session] = threading.Event()
        return flag

    def finish(self, session: str) -> None:
        self._flags.pop(session, None)

    def running(self, session: str, gen):
        """Run the turn generator `gen(flag)` with a fresh flag, forgetting it when the turn ends."""
        try:
            yield from gen(self.fresh(session))
        finally:
            self.finish(session)

    def stop(self, session: str) -> bool:
        flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True


def submit(models: Models, state: dict, message: str, system: str, side: bool, params: GenParams,
           stop: threading.Event | None = None):
    """A new user message; yields (state, status) as turn() does."""
    if not message or not message.strip():
        yield state, "type a message first"
        return
    if side:
        _sync_base(state)
    for key in ("tuned", "base") if side else ("tuned",):
        state[key].append({"role": "user", "content": message})
    yield from turn(models, state, system, side, params, stop)


def regenerate(models: Models, state: dict, system: str, side: bool, params: GenParams,
               stop: threading.Event | None = None):
    """Drop the last replies and answer the last user message again (new sample unless greedy)."""
    for key in ("tuned", "base"):
        while state[key] and state[key][-1]["role"] == "assistant":
            state[key].pop()
    if not state["tuned"]:
        yield state, "nothing to regenerate yet"
        return
    if side:
        _sync_base(state)
    yield from turn(models, state, system, side, params, stop)


# ---------------------------------------------------------------------------------------------
# The app


def _params(temperature, top_p, top_k, max_new_tokens, repetition_penalty) -> GenParams:
    return GenParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                     max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty))


def build_app(path: str | Path, *, base: bool | str | Path = False, system: str | None = None,
              params: GenParams | None = None, models: Models | None = None):
    """Load the model(s) and return the Gradio Blocks (not started; see `serve`).

    base: False = side-by-side available but off; True = on from the start (the base is loaded
    now, so errors show before the server starts); a path = that model dir / .gguf is the base.
    system: the initial system prompt (default: the run's data.system_prompt, what it trained with).
    params: the initial slider values. models: already resolved models (tests).
    """
    gr = _gradio()
    params = params or GenParams()
    models = models or resolve_models(path, base)
    side_on = bool(base) and models.base_available
    if side_on:
        models.base()  # load now: a failure belongs at startup, not in the first reply
    if system is None:
        system = models.default_system

    def run(gen):
        """Widget updates from a turn generator; user-fixable errors become a visible gr.Error."""
        try:
            for state, status in gen:
                active = state.get("active")
                yield state, view(state["tuned"], active == "tuned"), view(state["base"], active == "base"), status
        except LlamaftError as exc:
            raise gr.Error(str(exc)) from None
        yield state, view(state["tuned"]), view(state["base"]), status

    def params_of(sliders) -> GenParams:
        try:
            return _params(*sliders)
        except LlamaftError as exc:  # e.g. a number typed into a slider's box
            raise gr.Error(str(exc)) from None

    stops = Stops()

    # Explicit slider parameters (no *args): gradio injects `request` by its annotation.
    def on_send(message, state, system, side, temperature, top_p, top_k, max_new, rep, request: gr.Request):
        params = params_of((temperature, top_p, top_k, max_new, rep))
        turn_ = lambda stop: submit(models, state, message, system, side, params, stop)  # noqa: E731
        for out in run(stops.running(request.session_hash, turn_)):
            yield ("", *out)

    def on_regenerate(state, system, side, temperature, top_p, top_k, max_new, rep, request: gr.Request):
        params = params_of((temperature, top_p, top_k, max_new, rep))
        yield from run(stops.running(request.session_hash, lambda stop: regenerate(models, state, system, side, params, stop)))

    def on_stop(request: gr.Request):
        return "stopping …" if stops.stop(request.session_hash) else "nothing to stop"

    for fn in (on_send, on_regenerate, on_stop):  # the class itself: string annotations (this module
        fn.__annotations__["request"] = gr.Request  # uses __future__ annotations) would not resolve

    def on_clear():
        state = new_state()
        return state, [], [], "cleared"

    def on_side(side):
        if side:
            try:
                models.base()
            except LlamaftError as exc:
                raise gr.Error(str(exc)) from None
        return gr.update(visible=side)

    title = f"llamaft · {Path(str(path)).name}"
    # "fine-tuned" only where a run says so; a plain model dir or .gguf is just "model".
    tuned_label = f"fine-tuned: {models.tuned.label}" if models.run_dir else models.tuned.label
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        state = gr.State(new_state())
        gr.Markdown(f"### {title}\n`{path}` — {models.tuned.label}")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    tuned_chat = gr.Chatbot(label=tuned_label, elem_id="chat-tuned",
                                            height=420, feedback_options=None, buttons=["copy"])
                    with gr.Column(visible=side_on) as base_col:
                        base_chat = gr.Chatbot(label=f"base: {models.base_label}", elem_id="chat-base",
                                               height=420, feedback_options=None, buttons=["copy"])
                msg = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, elem_id="msg", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regen = gr.Button("Regenerate", elem_id="regenerate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1):
                sys_box = gr.Textbox(value=system, label="System prompt", lines=3, elem_id="system")
                side = gr.Checkbox(value=side_on, label="Side by side with the base model", elem_id="side",
                                   interactive=models.base_available, info=models.base_note)
                sliders = [
                    gr.Slider(0.0, 2.0, value=params.temperature, step=0.05, label="Temperature (0 = greedy)"),
                    gr.Slider(0.05, 1.0, value=params.top_p, step=0.05, label="Top-p"),
                    gr.Slider(0, 200, value=params.top_k, step=1, label="Top-k (0 = off)"),
                    gr.Slider(1, 4096, value=params.max_new_tokens, step=1, label="Max new tokens"),
                    gr.Slider(0.8, 2.0, value=params.repetition_penalty, step=0.01, label="Repetition penalty (1 = off)"),
                ]
        with gr.Accordion("Run summary", open=models.run_dir is not None, elem_id="summary"):
            facts, metrics = run_summary_parts(models.run_dir)
            with gr.Row():
                gr.Markdown(facts)
                gr.Markdown(metrics)

        chats = [state, tuned_chat, base_chat, status]
        # One queue slot shared by every generating event: the model serves one reply at a time
        # (and a LoRA run's base is the same weights with the adapter off, which must not overlap).
        gen_kw = dict(concurrency_limit=1, concurrency_id="generate", show_progress="hidden")
        inputs = [msg, state, sys_box, side, *sliders]
        send.click(on_send, inputs, [msg, *chats], **gen_kw)
        msg.submit(on_send, inputs, [msg, *chats], **gen_kw)
        regen.click(on_regenerate, [state, sys_box, side, *sliders], chats, **gen_kw)
        clear.click(on_clear, None, chats, queue=False)
        stop_btn.click(on_stop, None, status, queue=False)  # outside the queue: runs during a reply
        for chat in (tuned_chat, base_chat):  # their own trash icons must clear the conversation too
            chat.clear(on_clear, None, chats, queue=False)
        side.change(on_side, side, base_col, queue=False)
    return app


# ---------------------------------------------------------------------------------------------
# Serving


AUTH_ENV = "LLAMAFT_UI_AUTH"


def parse_auth(auth: str | tuple[str, str] | None, source: str = "--auth") -> tuple[str, str] | None:
    """'user:password' → (user, password); the password may contain ':'. Never echoes the value."""
    if auth is None or isinstance(auth, tuple):
        return auth
    user, sep, password = auth.strip("\r\n").partition(":")
    if not sep or not user or not password:
        raise LlamaftError(f"{source} must look like user:password (both non-empty)")
    return user, password


def resolve_auth(auth: str | None = None, auth_file: str | Path | None = None,
                 env: dict | None = None, warn=None) -> tuple[str, str] | None:
    """The UI's login from, in this order: --auth user:pass (visible to every user in `ps`, so a
    warning is printed), --auth-file PATH (one user:pass line), the LLAMAFT_UI_AUTH environment
    variable; None when none is given. Errors and warnings never contain the password."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    env = os.environ if env is None else env
    if auth is not None and auth_file is not None:
        raise LlamaftError("give --auth or --auth-file, not both")
    if auth is not None:
        warn(f"warning: --auth puts the password in the process list (any user can read it with `ps`); "
             f"use {AUTH_ENV}=user:password or --auth-file FILE instead")
        return parse_auth(auth)
    if auth_file is not None:
        return parse_auth(_read_auth_file(Path(auth_file).expanduser(), warn), f"--auth-file {auth_file}")
    if env.get(AUTH_ENV):
        return parse_auth(env[AUTH_ENV], AUTH_ENV)
    return None


def _read_auth_file(path: Path, warn) -> str:
    """The one non-empty line of an auth file; warns when others may read it (chmod 600)."""
    if path.is_dir():
        raise LlamaftError(f"--auth-file {path}: is a directory, not a file holding user:password")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LlamaftError(f"--auth-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        why = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else "not UTF-8 text"
        raise LlamaftError(f"--auth-file {path}: cannot read it ({why})") from None
    if len(lines) != 1:
        raise LlamaftError(f"--auth-file {path}: must hold exactly one user:password line (found {len(lines)} non-empty lines)")
    if mode & 0o077:
        warn(f"warning: --auth-file {path} can be read by other users (mode {mode & 0o777:03o}); chmod 600 {path}")
    return lines[0].strip()


def exposure_warning(host: str, auth) -> str | None:
    """The warning for a server reachable from other machines without a password, else None."""
    if host in LOOPBACK or auth:
        return None
    return (f"warning: serving on {host} without --auth: anyone who can reach this machine can use the model; "
            f"set {AUTH_ENV}=user:password (or --auth-file FILE), or keep the default --host 127.0.0.1")


def serve(app, host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    """Start `app` on host:port (port 0 = any free port); returns it, started. block=True waits for
    Ctrl-C and then stops the server."""
    gr = _gradio()
    pair = parse_auth(auth)
    warning = exposure_warning(host, pair)
    if warning:
        print(warning, file=sys.stderr)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host, server_port=port or _free_port(host), auth=pair,
            share=False, inbrowser=False, quiet=True, show_error=True, prevent_thread_lock=True,
            ssr_mode=False,          # no Node server: the page is the prebuilt static bundle
            enable_monitoring=False, mcp_server=False, pwa=False,
            footer_links=[],         # no "built with"/API links in an offline tool
            theme=gr.themes.Default(),  # its fonts are LocalFont: served by gradio, never fetched
            css=CSS,
        )
    except OSError as exc:
        raise LlamaftError(f"cannot serve on {host}:{port} ({str(exc).split('.')[0]}); choose another --port") from None
    print(f"llamaft web UI on {app.local_url}" + ("  (Ctrl-C to stop)" if block else ""), flush=True)
    if block:
        app.block_thread()
    return app


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_ui(path: str | Path, host: str = "127.0.0.1", port: int = 7860, auth=None,
              base: bool | str | Path = False, system: str | None = None, block: bool = True,
              params: GenParams | None = None):
    """`llamaft chat PATH --ui`: load, build and serve. Auth is checked before any model loads."""
    parse_auth(auth)
    print(f"loading {path} ...", flush=True)
    app = build_app(path, base=base, system=system, params=params)
    return serve(app, host=host, port=port, auth=auth, block=block)
