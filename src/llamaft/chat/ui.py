"""Web chat UI: `llamaft chat RUN_DIR|MODEL_DIR|FILE.gguf --ui [--host H] [--port N] [--auth-file FILE]`.

    launch_ui("runs/demo")                          # http://127.0.0.1:7860, blocks until Ctrl-C
    app = build_app("runs/demo", base=True)         # Gradio Blocks (tests start it on a free port)
    serve(app, port=0, block=False); ...; app.close()

Streaming chat through `llamaft.model.generate.stream_chat` (the one generation function that the
terminal chat and evaluation use: the model's chat template and every stop id), an editable system
prompt, the sampling settings, stop / clear / regenerate, a side-by-side mode that sends each prompt to
the base model too, and the run's summary when given a run directory (ui_summary.py).

This module is the Gradio layout and its wiring; what each button does to a conversation is
ui_state.py (no widgets), the login is ui_auth.py, the models behind the columns ui_backends.py.

Where the base model for side-by-side comes from (ui_backends.py, `resolve_models`):
  run dir with a LoRA adapter   the same weights with the adapter switched off (no second copy)
  run dir of a full fine-tune   load_for_inference(run, adapter=False), loaded on first use
  RUN/merged (a model dir inside a run)   that run's base, as above
  any other model dir / .gguf   only with an explicit base=PATH (CLI: --base PATH); otherwise the
                                side-by-side switch is disabled and says why.

Private by default: binds 127.0.0.1; any other host without auth prints a warning. The login comes
from LLAMAFT_UI_AUTH=user:pass or --auth-file FILE (`ui_auth.resolve_auth`); --auth user:pass still
works but is visible to every user in `ps`, so it prints a warning. No share
links, no telemetry (GRADIO_ANALYTICS_ENABLED=False before gradio is imported), no monitoring or
MCP endpoints, and the theme's fonts are the ones gradio ships, so the page loads offline.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before `import gradio`: gradio reads this at import and Blocks() time (version check, usage pings).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from ..errors import LlamaftError  # noqa: E402
from ..model.generate import GenParams  # noqa: E402
from .ui_auth import exposure_warning, parse_auth  # noqa: E402
from .ui_backends import Models, resolve_models  # noqa: E402
from .ui_state import Stops, new_state, params_from_sliders, regenerate, rendered, submit  # noqa: E402
from .ui_summary import run_summary_parts  # noqa: E402

CSS = "#status {min-height: 1.6em; opacity: 0.8} footer {display: none !important}"


def _gradio():
    try:
        import gradio as gr
    except ImportError as exc:  # an optional dependency: the terminal chat works without it
        raise LlamaftError(f"the web UI needs gradio: pip install 'gradio>=6' ({exc})") from None
    return gr


# ---------------------------------------------------------------------------------------------
# The app: layout, then the events wired to ui_state


@dataclass
class _Widgets:
    state: object
    tuned_chat: object
    base_chat: object
    base_col: object
    msg: object
    send: object
    regen: object
    stop_btn: object
    clear: object
    status: object
    sys_box: object
    side: object
    sliders: list


def build_app(path: str | Path, *, base: bool | str | Path = False, system: str | None = None,
              params: GenParams | None = None, models: Models | None = None):
    """Load the model(s) and return the Gradio Blocks (not started; see `serve`).

    base: False = side-by-side available but off; True = on from the start (the base is loaded
    now, so errors show before the server starts); a path = that model dir / .gguf is the base.
    system: the initial system prompt (default: the run's data.system_prompt, what it trained with).
    params: the initial slider values. models: already resolved models (tests).
    """
    gr = _gradio()
    models = models or resolve_models(path, base)
    side_on = bool(base) and models.base_available
    if side_on:
        models.base()  # load now: a failure belongs at startup, not in the first reply
    title = f"llamaft · {Path(str(path)).name}"
    header = f"### {title}\n`{path}` — {models.tuned.label}"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        w = _layout(gr, header, models, side_on, models.default_system if system is None else system, params or GenParams())
        _wire(gr, w, models)
    return app


def _layout(gr, header: str, models: Models, side_on: bool, system: str, params: GenParams) -> _Widgets:
    """The chat columns and buttons (left), the settings (right), the run summary (below)."""
    state = gr.State(new_state())
    gr.Markdown(header)
    # "fine-tuned" only where a run says so; a plain model dir or .gguf is just "model".
    tuned_label = f"fine-tuned: {models.tuned.label}" if models.run_dir else models.tuned.label
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
            sys_box, side, sliders = _settings(gr, models, side_on, system, params)
    with gr.Accordion("Run summary", open=models.run_dir is not None, elem_id="summary"):
        facts, metrics = run_summary_parts(models.run_dir)
        with gr.Row():
            gr.Markdown(facts)
            gr.Markdown(metrics)
    return _Widgets(state, tuned_chat, base_chat, base_col, msg, send, regen, stop_btn, clear, status, sys_box, side, sliders)


def _settings(gr, models: Models, side_on: bool, system: str, params: GenParams):
    """System prompt, side-by-side switch and the sampling sliders (in params_from_sliders' order)."""
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
    return sys_box, side, sliders


def _wire(gr, w: _Widgets, models: Models) -> None:
    """Connect the events; generating ones share one queue slot (see gen_kw)."""
    h = _Handlers(gr, models)
    chats = [w.state, w.tuned_chat, w.base_chat, w.status]
    # One queue slot shared by every generating event: the model serves one reply at a time
    # (and a LoRA run's base is the same weights with the adapter off, which must not overlap).
    gen_kw = dict(concurrency_limit=1, concurrency_id="generate", show_progress="hidden")
    inputs = [w.msg, w.state, w.sys_box, w.side, *w.sliders]
    w.send.click(h.on_send, inputs, [w.msg, *chats], **gen_kw)
    w.msg.submit(h.on_send, inputs, [w.msg, *chats], **gen_kw)
    w.regen.click(h.on_regenerate, [w.state, w.sys_box, w.side, *w.sliders], chats, **gen_kw)
    w.clear.click(h.on_clear, None, chats, queue=False)
    w.stop_btn.click(h.on_stop, None, w.status, queue=False)  # outside the queue: runs during a reply
    for chat in (w.tuned_chat, w.base_chat):  # their own trash icons must clear the conversation too
        chat.clear(h.on_clear, None, chats, queue=False)
    w.side.change(h.on_side, w.side, w.base_col, queue=False)


class _Handlers:
    """The event functions: ui_state's generators as widget updates, user errors as a visible gr.Error.
    Explicit slider parameters (no *args): gradio maps inputs by position and injects `request` by
    its annotation."""

    def __init__(self, gr, models: Models):
        self.gr, self.models, self.stops = gr, models, Stops()
        for fn in (self.on_send, self.on_regenerate, self.on_stop):  # the class itself: string annotations
            fn.__func__.__annotations__["request"] = gr.Request    # (__future__ annotations) would not resolve

    def _shown(self, steps):
        try:
            yield from rendered(steps)
        except LlamaftError as exc:
            raise self.gr.Error(str(exc)) from None

    def _params(self, *sliders) -> GenParams:
        try:
            return params_from_sliders(*sliders)
        except LlamaftError as exc:  # e.g. a number typed into a slider's box
            raise self.gr.Error(str(exc)) from None

    def on_send(self, message, state, system, side, temperature, top_p, top_k, max_new, rep, request):
        params = self._params(temperature, top_p, top_k, max_new, rep)
        turn_ = lambda stop: submit(self.models, state, message, system, side, params, stop)  # noqa: E731
        for out in self._shown(self.stops.running(request.session_hash, turn_)):
            yield ("", *out)

    def on_regenerate(self, state, system, side, temperature, top_p, top_k, max_new, rep, request):
        params = self._params(temperature, top_p, top_k, max_new, rep)
        turn_ = lambda stop: regenerate(self.models, state, system, side, params, stop)  # noqa: E731
        yield from self._shown(self.stops.running(request.session_hash, turn_))

    def on_stop(self, request):
        return "stopping …" if self.stops.stop(request.session_hash) else "nothing to stop"

    def on_clear(self):
        return new_state(), [], [], "cleared"

    def on_side(self, side):
        if side:
            try:
                self.models.base()
            except LlamaftError as exc:
                raise self.gr.Error(str(exc)) from None
        return self.gr.update(visible=side)


# ---------------------------------------------------------------------------------------------
# Serving


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
