"""`llamaft export`: the command glue over merged-HF and GGUF export, the self-check verdict (which
decides the exit code), and the hub push: what is uploaded, that the token is never printed, and one
clear line when the Hub is offline, unreachable or refuses."""

import json
from pathlib import Path

import pytest

from inference_helpers import make_run_dir
from llamaft.assets import gguf_reader  # gguf's own reader over a plain ndarray view (faster)
from llamaft.cli import main
from path_helpers import one_error_line


def test_export_hf_from_a_run_dir(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--dtype", "float16"]) == 0
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    gen = json.loads((out / "generation_config.json").read_text())
    # the tiny tokenizer's stop ids: <|end_of_text|> 257 and <|eot_id|> 260; pad <|finetune_right_pad_id|> 261
    assert gen["eos_token_id"] == [257, 260] and gen["pad_token_id"] == 261
    assert f"exported: {out}" in capsys.readouterr().out
    # a second export into the same place is refused unless --overwrite
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--overwrite"]) == 0


@pytest.fixture(scope="module")
def smol_model(tmp_path_factory):
    from gguf_helpers import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("smol") / "m", "smollm2")


def test_export_gguf_from_a_model_dir_with_verdict(smol_model, tmp_path, capsys):
    import gguf

    out = tmp_path / "m.gguf"
    assert main(["export", str(smol_model), "--format", "gguf", "--quant", "f16", "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    # valid GGUF, read back: the model's metadata and every tensor (2 layers x 9 + embeddings + norm, tied head)
    reader = gguf_reader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.name"].contents() == "m"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>
    assert len(reader.tensors) == 2 * 9 + 2
    printed = capsys.readouterr().out
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skip = [ln for ln in printed.splitlines() if ln.startswith("self-check skipped")]
        assert skip == ["self-check skipped: llama-cpp-python is not installed "
                        "(scripts/build_llama_cpp_wheel.sh builds it; --no-check silences this)"]
        assert printed.splitlines()[-1] == f"exported: {out}"
    else:
        assert "PASS" in printed.upper()


def _report(passed: bool):
    from llamaft.export.gguf_check import GGUFReport, PromptCheck

    gen, hf = [5, 6, 2], ([5, 6, 2] if passed else [5, 9, 9])
    margins = [0.0, 0.0, 0.0] if passed else [0.0, 5.0, 5.0]  # HF prefers its own token by 5 logits: real flips
    return GGUFReport("m.gguf", "F16", tokenization_total=9, prompts=[PromptCheck(4, gen, hf, 0.01, margins)],
                      stop_ids=[2], stopped=1)


@pytest.mark.parametrize("passed", [True, False])
def test_self_check_verdict_decides_the_exit_code(smol_model, tmp_path, monkeypatch, capsys, passed):
    """The check runs (llama.cpp stood in for): a PASS exits 0, a FAIL exits 2 with one line, and the
    file is kept for inspection either way."""
    import llamaft.export.gguf as gguf_mod
    import llamaft.export.gguf_check as gguf_check

    seen = []
    monkeypatch.setattr(gguf_check, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(gguf_mod, "check_gguf", lambda path, model_dir: seen.append((path, model_dir)) or _report(passed))
    out = tmp_path / "m.gguf"
    rc = main(["export", str(smol_model), "--format", "gguf", "--out", str(out)])
    captured = capsys.readouterr()
    assert seen == [(out, smol_model)] and out.read_bytes()[:4] == b"GGUF"
    if passed:
        assert rc == 0 and "PASS m.gguf [F16]" in captured.out and captured.err == ""
    else:
        assert rc == 2 and "FAIL m.gguf [F16]" in captured.out
        line = one_error_line(captured.err, "export", str(out), "GGUF self-check failed", "kept for inspection")
        assert "greedy differs over 3 tokens" in line and "2 other" in line  # the verdict's numbers
        assert f"exported: {out}" not in captured.out


# -- hub upload -----------------------------------------------------------------------------------

TOKEN = "hf_SENTINELtokenNEVERprinted0123456789"


@pytest.fixture
def online(monkeypatch):
    """The Hub as if online, with a sentinel token: conftest's HF_HUB_OFFLINE=1 is lifted for this test
    (huggingface_hub reads it into constants at import, so the environment alone does not)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return constants


def _assert_no_token(captured):
    assert TOKEN not in captured.out and TOKEN not in captured.err
    assert TOKEN[:12] not in captured.out + captured.err


def test_push_to_hub_offline_mode_is_one_line_before_any_export(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    run = make_run_dir(tmp_path / "run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    capsys.readouterr()
    rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/model"])
    captured = capsys.readouterr()
    assert rc == 2
    one_error_line(captured.err, "export", "--push-to-hub me/model", "offline mode (HF_HUB_OFFLINE=1)")
    assert not (tmp_path / "hf").exists()  # refused before exporting anything
    _assert_no_token(captured)


def test_push_to_hub_unreachable_hub_is_one_line(tmp_path, monkeypatch, online, capsys):
    """A real connection attempt to a port nobody listens on: huggingface_hub raises its HTTP client's
    ConnectError (httpx2 in huggingface_hub 2.x: not an OSError), which must still be one line."""
    from huggingface_hub import HfApi

    run = make_run_dir(tmp_path / "run")
    monkeypatch.setattr(online, "ENDPOINT", "http://127.0.0.1:9")
    raised = []
    real = HfApi.create_repo

    def create_repo(self, *a, **k):
        try:
            return real(self, *a, **k)
        except BaseException as err:
            raised.append(err)
            raise

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    out = tmp_path / "hf"
    capsys.readouterr()
    rc = main(["export", str(run), "--format", "hf", "--out", str(out), "--push-to-hub", "me/model"])
    captured = capsys.readouterr()
    assert rc == 2 and len(raised) == 1
    assert type(raised[0]).__name__ == "ConnectError"  # the library's own error reached our handler
    line = one_error_line(captured.err, "export", "push to me/model failed",
                          "cannot reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectError")
    assert line.endswith(f"the export in {out} is kept")
    assert (out / "model.safetensors").is_file()
    _assert_no_token(captured)


def test_push_to_hub_connection_lost_during_upload(tmp_path, monkeypatch, online, capsys):
    import sys

    from huggingface_hub import HfApi

    run = make_run_dir(tmp_path / "run")
    client = sys.modules.get("httpx2") or pytest.importorskip("httpx")  # huggingface_hub's HTTP client
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)

    def upload_folder(self, **k):
        raise client.ReadTimeout("The read operation timed out")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/model"])
    captured = capsys.readouterr()
    assert rc == 2
    one_error_line(captured.err, "export", "push to me/model failed", "(ReadTimeout: The read operation timed out)")
    _assert_no_token(captured)


def test_push_to_hub_refused_by_the_hub_names_the_repo_and_hides_the_token(tmp_path, monkeypatch, online, capsys):
    """A real HTTP 401 from a local stand-in for the Hub whose message echoes the token."""
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.dumps({"error": f"Invalid credentials in Authorization header: {self.headers['authorization']}"})
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(online, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        run = make_run_dir(tmp_path / "run")
        capsys.readouterr()
        rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/model"])
    finally:
        server.shutdown()
    captured = capsys.readouterr()
    assert rc == 2
    line = one_error_line(captured.err, "export", "push to me/model failed", "401")
    assert "401" in line and line.endswith(f"Invalid credentials in Authorization header: Bearer ***; the export in {tmp_path / 'hf'} is kept")
    _assert_no_token(captured)


def test_push_to_hub_bad_repo_id_or_no_token_fails_before_export(tmp_path, monkeypatch, online, capsys):
    run = make_run_dir(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/bad name"]) == 2
    one_error_line(capsys.readouterr().err, "export", "--push-to-hub me/bad name: not a repository id")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(online, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/model"]) == 2
    one_error_line(capsys.readouterr().err, "export", "no Hugging Face token")
    assert not (tmp_path / "hf").exists()


class FakeHub:
    """Records what would be uploaded (and with which token), in place of HfApi's network calls."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi, get_token

        self.calls = []
        hub = self

        def create_repo(api, repo_id, private=None, exist_ok=False, **k):
            hub.calls.append(("create_repo", repo_id, private, exist_ok, get_token()))

        def upload_folder(api, *, folder_path, repo_id, **k):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            hub.calls.append(("upload_folder", repo_id, str(folder_path), files, get_token()))

        def create_commit(api, repo_id, operations, **k):
            ops = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
            hub.calls.append(("create_commit", repo_id, ops, get_token()))

        for name, fn in (("create_repo", create_repo), ("upload_folder", upload_folder), ("create_commit", create_commit)):
            monkeypatch.setattr(HfApi, name, fn)


def test_push_to_hub_uploads_the_model_dir_and_never_prints_the_token(tmp_path, monkeypatch, online, capsys):
    hub = FakeHub(monkeypatch)
    run = make_run_dir(tmp_path / "run")
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--push-to-hub", "me/model", "--private"]) == 0
    captured = capsys.readouterr()
    assert hub.calls == [
        ("create_repo", "me/model", True, True, TOKEN),
        ("upload_folder", "me/model", str(out), ["chat_template.jinja", "config.json", "generation_config.json",
                                                  "model.safetensors", "tokenizer.json", "tokenizer_config.json"], TOKEN),
    ]
    assert captured.out.splitlines()[-1] == "pushed: https://huggingface.co/me/model"
    _assert_no_token(captured)


def test_push_to_hub_uploads_the_gguf_and_its_modelfile(smol_model, tmp_path, monkeypatch, online, capsys):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "m.gguf"
    rc = main(["export", str(smol_model), "--format", "gguf", "--out", str(out), "--ollama", "--no-check",
               "--push-to-hub", "me/model-gguf"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert hub.calls == [
        ("create_repo", "me/model-gguf", False, True, TOKEN),
        ("create_commit", "me/model-gguf", [("m.gguf", str(out)), ("Modelfile", str(tmp_path / "Modelfile"))], TOKEN),
    ]
    _assert_no_token(captured)
