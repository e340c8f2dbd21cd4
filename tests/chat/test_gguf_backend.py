"""`llamaft chat FILE.gguf`: every sampling flag reaches llama.cpp's generate (llama.cpp itself is
replaced by a recording stand-in; tests/export/test_gguf_llamacpp.py runs the real binding)."""

import io
import sys
import types

import jinja2
import pytest

import llamaft.chat.gguf_backend as gb
from llamaft.cli import main

EOG = 0


class _RecordingLlama:
    """What stream_chat_gguf uses of llama_cpp.Llama: tokenize, n_ctx, generate, detokenize, _model.vocab."""

    def __init__(self):
        self.calls = []
        self._model = types.SimpleNamespace(vocab="VOCAB")

    def tokenize(self, text, add_bos, special):
        return list(range(1, len(text) + 1))

    def n_ctx(self):
        return 4096

    def generate(self, ids, **kwargs):
        self.calls.append(kwargs)
        yield from (ord("o"), ord("k"), EOG)

    def detokenize(self, ids):
        return bytes(ids)


@pytest.fixture
def llm(monkeypatch, tmp_path):
    fake = _RecordingLlama()
    template = jinja2.Template("{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setattr(gb, "load_gguf", lambda path: gb.GGUFChat(fake, template, "", "", str(path)))
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(llama_vocab_is_eog=lambda vocab, t: t == EOG))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    return fake


def test_every_sampling_flag_reaches_llama_cpp(llm, capsys):
    code = main(["chat", "m.gguf", "--temperature", "0.3", "--top-p", "0.8", "--top-k", "7",
                 "--repetition-penalty", "1.25", "--max-new-tokens", "5"])
    assert code == 0
    assert llm.calls == [dict(temp=0.3, top_p=0.8, top_k=7, min_p=0.0, repeat_penalty=1.25)]
    assert "assistant> ok\n" in capsys.readouterr().out


def test_defaults_leave_top_k_and_repetition_penalty_off(llm):
    assert main(["chat", "m.gguf"]) == 0
    assert llm.calls == [dict(temp=0.7, top_p=0.9, top_k=0, min_p=0.0, repeat_penalty=1.0)]
