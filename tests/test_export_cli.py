"""`llamaft export`: the command glue over merged-HF and GGUF export, the self-check verdict, and a
hub push that fails with one clear line when the Hub cannot be reached."""

import json

import pytest

from llamaft.cli import main
from inference_helpers import make_run_dir


def test_export_hf_from_a_run_dir(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--dtype", "float16"]) == 0
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert f"exported: {out}" in capsys.readouterr().out
    # a second export into the same place is refused unless --overwrite
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--overwrite"]) == 0


def test_export_gguf_from_a_model_dir_with_verdict(tmp_path, capsys):
    from test_gguf_export import make_model_dir

    model = make_model_dir(tmp_path / "m", "smollm2")
    out = tmp_path / "m.gguf"
    assert main(["export", str(model), "--format", "gguf", "--quant", "f16", "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    printed = capsys.readouterr().out
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "self-check skipped" in printed
    else:
        assert "PASS" in printed.upper()


def test_push_to_hub_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    run = make_run_dir(tmp_path / "run")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0123456789")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--push-to-hub", "me/model"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "push to me/model failed" in err
    assert "hf_not_a_real_token" not in err  # the token is never printed
