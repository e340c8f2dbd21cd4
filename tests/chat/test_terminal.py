"""Terminal chat with scripted input on a tiny saved model directory."""

import io

import pytest

from inference_helpers import save_model_dir, tiny_model, tiny_rules, tiny_tokenizer
from llamaft.model.generate import GenParams, stream_chat
from llamaft.chat.terminal import chat_loop
from llamaft.errors import LlamaftError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_model_dir(tiny_model(seed=7), tok, tiny_rules(tok), tmp_path_factory.mktemp("chat") / "m")


def _script(lines, raise_at_end=EOFError):
    it = iter(lines)

    def input_fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise raise_at_end from None

    return input_fn


def test_scripted_conversation(model_dir):
    from llamaft.model.inference import load_for_inference

    loaded = load_for_inference(model_dir, device="cpu")
    out = io.StringIO()
    history = chat_loop(model_dir, system="be brief", temperature=0, max_new_tokens=6,
                        input_fn=_script(["hello", "", "/reset", "again", "second", "/bogus", "/exit", "never read"]),
                        out=out, loaded=loaded)
    # /reset dropped "hello"; two exchanges after it, each reply the streamed greedy text.
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "again" and history[3]["content"] == "second"
    model, tok, rules = loaded
    expected = "".join(stream_chat(model, tok, rules, history[:2], GenParams(temperature=0, max_new_tokens=6)))
    assert history[2]["content"] == expected
    text = out.getvalue()
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert text.count("assistant> ") == 3


def test_loads_path_and_exits_on_eof_and_ctrl_c(model_dir):
    out = io.StringIO()
    history = chat_loop(model_dir, temperature=0, max_new_tokens=3, input_fn=_script(["hi"]), out=out)  # then EOF
    assert [m["role"] for m in history] == ["user", "assistant"] and "loading" in out.getvalue()
    history = chat_loop(model_dir, max_new_tokens=3, input_fn=_script([], KeyboardInterrupt), out=io.StringIO())
    assert history == []


def test_bad_settings_fail_before_loading(tmp_path):
    with pytest.raises(LlamaftError, match="temperature"):
        chat_loop(tmp_path / "missing", temperature=-1, input_fn=_script([]), out=io.StringIO())
    with pytest.raises(LlamaftError, match="no such file"):
        chat_loop(tmp_path / "missing", input_fn=_script([]), out=io.StringIO())


class _InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the first streamed piece of the first reply."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def write(self, s):
        if self.armed and s and s != "\n":
            self.armed = False
            raise KeyboardInterrupt
        if s == "assistant> " and "interrupted" not in self.getvalue():
            self.armed = True
        return super().write(s)


def test_ctrl_c_interrupts_reply_only(model_dir):
    out = _InterruptingOut()
    history = chat_loop(model_dir, temperature=0, max_new_tokens=8, input_fn=_script(["first", "second"]), out=out)
    assert "(interrupted)" in out.getvalue()
    assert [m["content"] for m in history if m["role"] == "user"] == ["second"]  # the interrupted turn is dropped


def test_a_run_chats_with_its_training_system_prompt_unless_told_otherwise(tmp_path):
    """`llamaft chat RUN` (and RUN/merged, RUN/x.gguf) uses data.system_prompt as training did, and says so."""
    from llamaft.model.inference import load_for_inference
    from ui_helpers import letters_only_run

    run = letters_only_run(tmp_path, system_prompt="Answer in one word.")
    loaded = load_for_inference(run, device="cpu")
    out = io.StringIO()
    history = chat_loop(run, temperature=0, max_new_tokens=3, input_fn=_script(["hi"]), out=out, loaded=loaded)
    assert history[0] == {"role": "system", "content": "Answer in one word."}
    assert "system prompt (the run's data.system_prompt; --system to change): Answer in one word." in out.getvalue()
    (run / "merged").mkdir()
    for inside in (run / "merged", run / "model-f16.gguf"):
        out = io.StringIO()
        history = chat_loop(inside, temperature=0, max_new_tokens=3, input_fn=_script(["hi"]), out=out, loaded=loaded)
        assert history[0]["content"] == "Answer in one word.", inside
    out = io.StringIO()
    history = chat_loop(run, system="", temperature=0, max_new_tokens=3, input_fn=_script(["hi"]), out=out, loaded=loaded)
    assert history[0]["role"] == "user" and "system prompt" not in out.getvalue()  # --system '' : none
