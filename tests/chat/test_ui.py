"""Web UI logic without a browser: conversations, side-by-side, base resolution, summary, serving rules.
The real-browser test is test_ui_browser.py."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from ui_helpers import letters_only_run
from llamaft.chat import ui, ui_auth, ui_state
from llamaft.model.generate import GenParams, stream_chat
from llamaft.chat.ui_backends import Backend, Models, resolve_models
from llamaft.chat.ui_summary import run_summary_markdown
from llamaft.errors import LlamaftError

GREEDY = GenParams(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return letters_only_run(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def models(run):
    return resolve_models(run)


def _fake_models(seen: list) -> Models:
    """Backends that record what they were sent and stream three pieces."""

    def backend(name):
        def stream(messages, params):
            seen.append((name, [dict(m) for m in messages], params))
            yield from (f"{name}-1", " ", f"{name}-2")

        return Backend(name, stream)

    base = backend("base")
    return Models(backend("tuned"), "base", "note", lambda: base)


def test_submit_streams_with_system_prompt_and_history():
    seen = []
    m, state = _fake_models(seen), ui_state.new_state()
    # Streaming: the UI sees the reply grow piece by piece (the state is updated in place), then a status.
    steps = [(s["tuned"][-1]["content"], status) for s, status in ui_state.submit(m, state, "hi", "Be terse.", False, GREEDY)]
    assert [text for text, _ in steps] == ["", "tuned-1", "tuned-1 ", "tuned-1 tuned-2", "tuned-1 tuned-2"]
    assert steps[-1][1].startswith("done in") and steps[0][1] == "generating (tuned) …"
    assert state["tuned"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "tuned-1 tuned-2"}]
    assert seen[0][1] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert seen[0][2] is GREEDY
    list(ui_state.submit(m, state, "again", "", False, GREEDY))  # blank system prompt: no system message
    assert [x["role"] for x in seen[1][1]] == ["user", "assistant", "user"]
    assert state["base"] == []  # side-by-side off: the base is not asked


def test_side_by_side_joins_mid_conversation_and_regenerates_both():
    seen = []
    m, state = _fake_models(seen), ui_state.new_state()
    list(ui_state.submit(m, state, "one", "", False, GREEDY))
    list(ui_state.submit(m, state, "two", "", True, GREEDY))
    assert [n for n, _, _ in seen] == ["tuned", "tuned", "base"]  # sequential: tuned, then base
    # The base got the conversation so far (with the tuned model's first reply) plus the new prompt.
    assert seen[2][1] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "tuned-1 tuned-2"},
                          {"role": "user", "content": "two"}]
    assert state["base"][-1] == {"role": "assistant", "content": "base-1 base-2"}
    assert state["base"][1]["context"] and "kept as context" in ui_state.view(state["base"])[1]["content"]
    list(ui_state.regenerate(m, state, "", True, GREEDY))
    assert len(state["tuned"]) == len(state["base"]) == 4  # last replies replaced, not appended
    assert seen[-1][1][-1] == {"role": "user", "content": "two"} and seen[-2][1][-1] == {"role": "user", "content": "two"}
    state = ui_state.new_state()
    assert list(ui_state.regenerate(m, state, "", True, GREEDY))[-1][1] == "nothing to regenerate yet"
    assert list(ui_state.submit(m, state, "   ", "", True, GREEDY))[-1][1] == "type a message first"


def test_stop_ends_the_reply_closes_the_generation_and_skips_the_base():
    import threading

    closed, stop = [], threading.Event()

    def stream(messages, params):
        try:
            for i in range(100):
                if i == 2:
                    stop.set()  # the Stop button, pressed while the second piece streams
                yield f"p{i} "
        finally:
            closed.append(True)  # stream_chat's finally is what cancels the model thread

    base_asked = []
    m = Models(Backend("tuned", stream), "base", "note", lambda: base_asked.append(1) or Backend("base", stream))
    state = ui_state.new_state()
    steps = list(ui_state.submit(m, state, "hi", "", True, GREEDY, stop))
    assert state["tuned"][-1]["content"] == "p0 p1 " and closed == [True]
    assert steps[-1][1].startswith("stopped after") and not base_asked
    assert state["base"] == []  # the unanswered prompt is dropped; the next side-by-side turn re-syncs it
    stops = ui_state.Stops()
    assert not stops.stop("s1")  # nothing running in that session
    seen = []
    for _ in stops.running("s1", lambda flag: (seen.append(flag), (yield 1))):
        assert stops.stop("s1") and seen[0].is_set()  # Stop during the turn reaches its flag
    assert not stops.stop("s1")  # the turn ended: nothing to stop any more
    assert not stops.fresh("s1").is_set()  # a new turn starts clear


def test_view_marks_streaming_and_empty_replies():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    assert ui_state.view(msgs, pending=True)[-1]["content"] == ui_state.CURSOR
    assert ui_state.view(msgs)[-1]["content"] == ui_state.EMPTY
    assert msgs[-1]["content"] == ""  # the history itself is never decorated


def test_run_dir_models_real_replies_and_adapter_off_base(run, models):
    """Tuned = stream_chat on the run; base = the adapter switched off, which must equal loading the
    base separately (load_for_inference(run, adapter=False)), and differ from the tuned reply."""
    from llamaft.model.inference import load_for_inference

    assert models.default_system == "Answer briefly."  # the run's data.system_prompt
    assert models.run_dir == run and models.base_available
    state = ui_state.new_state()
    list(ui_state.submit(models, state, "Hello", "Answer briefly.", True, GREEDY))
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"}]
    tuned = "".join(stream_chat(*load_for_inference(run), msgs, GREEDY))
    base = "".join(stream_chat(*load_for_inference(run, adapter=False), msgs, GREEDY))
    assert state["tuned"][-1]["content"] == tuned and state["base"][-1]["content"] == base
    assert tuned.strip() and base.strip() and tuned != base
    assert set(tuned + base) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    # After the base reply the adapter is back on: the tuned model answers as before.
    assert "".join(models.tuned.stream(msgs, GREEDY)) == tuned


def test_model_dir_base_resolution(run, tmp_path):
    merged = run / "merged"  # a plain model dir inside the run, where `llamaft demo` puts merges
    shutil.copytree(run.parent / "base", merged)
    m = resolve_models(merged)
    assert m.run_dir == run and m.base_available and "base model of the run" in m.base_note
    alone = tmp_path / "alone"
    shutil.copytree(run.parent / "base", alone)
    m = resolve_models(alone)
    assert not m.base_available and "--base PATH" in m.base_note and m.run_dir is None
    with pytest.raises(LlamaftError, match="side-by-side is unavailable"):
        m.base()
    with pytest.raises(LlamaftError, match="--base PATH"):
        resolve_models(alone, base=True)
    m = resolve_models(alone, base=str(run.parent / "base"))  # explicit base, loaded on first use
    assert m.base_available and m.base().label == "base"


def test_gguf_goes_through_the_gguf_backend(tmp_path, monkeypatch):
    """Wiring only (llama.cpp itself is the gguf backend's tests' business): load_gguf once, then
    stream_chat_gguf(handle, messages, params) per reply; no base recorded in a .gguf."""
    import llamaft.chat.gguf_backend as gb

    calls = []
    monkeypatch.setattr(gb, "load_gguf", lambda path: calls.append(path) or "HANDLE")
    monkeypatch.setattr(gb, "stream_chat_gguf", lambda h, msgs, p: iter([h, ":", msgs[-1]["content"]]))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    m = resolve_models(f)
    assert calls == [str(f)] and not m.base_available and "--base PATH" in m.base_note
    state = ui_state.new_state()
    list(ui_state.submit(m, state, "hey", "", False, GREEDY))
    assert state["tuned"][-1]["content"] == "HANDLE:hey"
    with pytest.raises(LlamaftError, match="no such file"):
        resolve_models(tmp_path / "missing.gguf")


def test_run_summary_markdown(run, tmp_path):
    md = run_summary_markdown(run)
    for text in ("| method | lora |", "| final train loss | 1.234 |", "| steps | 7 |", "| training examples | 8 |",
                 "| capitals_val/exact_match | 0.1 | 0.75 |", "| system prompt | Answer briefly. |", "r=4, alpha=8"):
        assert text in md, text
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    md = run_summary_markdown(tmp_path)
    assert "could not read config.yaml" in md and "no summary.json" in md
    assert "plain model" in run_summary_markdown(None)


def test_auth_and_exposure_rules():
    assert ui_auth.parse_auth("me:p:w") == ("me", "p:w")
    for bad in ("nopass", ":x", "x:"):
        with pytest.raises(LlamaftError) as e:
            ui_auth.parse_auth(bad)
        assert bad not in str(e.value)  # the message never echoes the value (it holds the password)
    assert ui_auth.exposure_warning("127.0.0.1", None) is None
    assert ui_auth.exposure_warning("0.0.0.0", ("u", "p")) is None
    assert "without --auth" in ui_auth.exposure_warning("0.0.0.0", None)


PASSWORD = "Sup3r-S3cret:pw"  # with a ':' (allowed in the password)


def test_auth_sources_and_warnings(tmp_path):
    """--auth (warned: visible in `ps`) > --auth-file (warned when others can read it) > LLAMAFT_UI_AUTH."""
    warned = []
    assert ui_auth.resolve_auth(env={}, warn=warned.append) is None
    assert ui_auth.resolve_auth(env={"LLAMAFT_UI_AUTH": f"alice:{PASSWORD}"}, warn=warned.append) == ("alice", PASSWORD)
    f = tmp_path / "auth"
    f.write_text(f"\nalice:{PASSWORD}\n")
    f.chmod(0o600)
    assert ui_auth.resolve_auth(auth_file=str(f), env={"LLAMAFT_UI_AUTH": "env:x"}, warn=warned.append) == ("alice", PASSWORD)
    assert warned == []  # env and an owner-only file: nothing to warn about
    assert ui_auth.resolve_auth(f"bob:{PASSWORD}", env={"LLAMAFT_UI_AUTH": "env:x"}, warn=warned.append) == ("bob", PASSWORD)
    assert len(warned) == 1 and "process list" in warned[0] and "LLAMAFT_UI_AUTH" in warned[0] and "--auth-file" in warned[0]
    f.chmod(0o644)
    assert ui_auth.resolve_auth(auth_file=f, env={}, warn=warned.append) == ("alice", PASSWORD)
    assert warned[1] == f"warning: --auth-file {f} can be read by other users (mode 644); chmod 600 {f}"
    assert not any(PASSWORD in w or "Sup3r" in w for w in warned)
    with pytest.raises(LlamaftError, match="is a directory"):
        ui_auth.resolve_auth(auth_file=tmp_path, env={})
    with pytest.raises(LlamaftError, match="^LLAMAFT_UI_AUTH must look like user:password") as e:
        ui_auth.resolve_auth(env={"LLAMAFT_UI_AUTH": "Sup3r"})
    assert "Sup3r" not in str(e.value)


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"), ("", "found 0 non-empty lines"), ("a:b\nc:d\n", "found 2 non-empty lines"),
    (f"alice{PASSWORD.replace(':', '')}", "must look like user:password"), (f"alice:{PASSWORD}", "not both"),
])
def test_auth_file_errors_never_echo_the_password(tmp_path, content, expected):
    f = tmp_path / "auth"
    if content is not None:
        f.write_text(content)
    with pytest.raises(LlamaftError) as e:
        ui_auth.resolve_auth(auth="x:y" if expected == "not both" else None, auth_file=f, env={}, warn=lambda m: None)
    assert expected in str(e.value) and "Sup3r" not in str(e.value)


def test_chat_ui_cli_takes_auth_from_env_file_or_flag(tmp_path, monkeypatch, capsys):
    from llamaft.cli import main

    got = []
    monkeypatch.setattr(ui, "launch_ui", lambda path, **k: got.append(k["auth"]))
    monkeypatch.setenv("LLAMAFT_UI_AUTH", f"env:{PASSWORD}")
    assert main(["chat", "runs/x", "--ui"]) == 0
    f = tmp_path / "auth"
    f.write_text(f"file:{PASSWORD}\n")
    f.chmod(0o400)
    assert main(["chat", "runs/x", "--ui", "--auth-file", str(f)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and got == [("env", PASSWORD), ("file", PASSWORD)]
    assert main(["chat", "runs/x", "--ui", "--auth", f"flag:{PASSWORD}"]) == 0
    captured = capsys.readouterr()
    assert got[-1] == ("flag", PASSWORD)
    assert captured.err.startswith("warning: --auth puts the password in the process list") and captured.err.count("\n") == 1
    assert main(["chat", "runs/x", "--ui", "--auth-file", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"llamaft chat: error: --auth-file {tmp_path / 'missing'}: no such file\n"
    assert "Sup3r" not in captured.out + captured.err and len(got) == 3
    assert main(["chat", "--help"]) == 0  # main returns argparse's exit code instead of raising SystemExit
    help_text = capsys.readouterr().out
    assert "--auth-file FILE" in help_text and "LLAMAFT_UI_AUTH" in help_text and "process" in help_text


def test_server_is_local_private_and_password_protected(run, models, capsys):
    """Served on a free loopback port: the page needs the password; no share link, analytics off."""
    app = ui.build_app(run, models=models)
    ui.serve(app, port=0, auth="alice:s3cret", block=False)
    try:
        url = app.local_url
        assert url.startswith("http://127.0.0.1:") and app.share_url is None and not app.analytics_enabled
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "config", timeout=120)  # generous: CI machines can be loaded
        assert e.value.code == 401
        assert "s3cret" not in capsys.readouterr().out
    finally:
        app.close()
