"""Unusable output paths for `merge` and `export`: one `llamaft CMD: error:` line naming the path,
exit 2, no traceback, nothing half-written, and an existing good output never replaced by a failed one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from inference_helpers import make_run_dir
from llamaft.cli import main
from path_helpers import enospc_after_partial_write, hidden, one_error_line, readonly_dir, tiny_disk


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the command had to stop before it."""
    import llamaft.export.hf as hf_mod
    import llamaft.model.merged as merged_mod

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    for module in (merged_mod, hf_mod):  # the modules that load (they imported the name)
        monkeypatch.setattr(module, "load_for_inference", boom)


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- merge --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_model_load")
def test_merge_out_is_a_file_or_under_a_file(run, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert main(["merge", str(run), "--out", str(f)]) == 2
    assert one_error_line(capsys.readouterr().err, "merge", str(f), "not a directory")
    assert main(["merge", str(run), "--out", str(f / "merged")]) == 2
    line = one_error_line(capsys.readouterr().err, "merge", str(f / "merged"))
    assert line.endswith(f"{f} is a file, not a directory")
    assert f.read_text() == "keep me" and hidden(tmp_path) == []


@pytest.mark.usefixtures("no_model_load")
def test_merge_out_unwritable(run, tmp_path, capsys):
    with readonly_dir(tmp_path) as ro:
        assert main(["merge", str(run), "--out", str(ro / "merged")]) == 2
        line = one_error_line(capsys.readouterr().err, "merge", str(ro / "merged"), f"cannot write in {ro}")
        assert os.strerror(errno.EROFS) in line or os.strerror(errno.EACCES) in line
        assert list(ro.iterdir()) == []


def test_merge_disk_full_mid_write_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    """The safetensors writer fails after writing part of the weights (ENOSPC): one line naming --out,
    no output directory, no staging directory."""
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", lambda tensors, filename, **k: enospc_after_partial_write(filename))
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "merge", str(out), "No space left on device")
    assert line == f"llamaft merge: error: {out}: write failed: No space left on device; nothing was written"
    assert not out.exists() and hidden(tmp_path) == []


def test_merge_disk_full_keeps_the_previous_output(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "float32"]) == 0
    before = _tree(out)
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", lambda tensors, filename, **k: enospc_after_partial_write(filename))
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(out), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, "merge", str(out), "No space left on device")
    assert _tree(out) == before and hidden(tmp_path) == []


def test_merge_on_a_really_full_disk(run, tmp_path, capsys):
    """A 64 KiB filesystem: the write probe passes, the weights (~150 KB) do not fit."""
    with tiny_disk(tmp_path) as disk:
        out = disk / "merged"
        capsys.readouterr()
        assert main(["merge", str(run), "--out", str(out), "--dtype", "float32"]) == 2
        one_error_line(capsys.readouterr().err, "merge", str(out), "No space left on device")
        assert list(disk.iterdir()) == []


def test_a_killed_merge_leaves_staging_that_the_next_merge_removes(run, tmp_path, capsys):
    """Kill a merge in the middle of writing (SIGKILL: no cleanup runs), then merge again."""
    out = tmp_path / "merged"
    code = (
        "import sys, os, signal, transformers.modeling_utils as mu\n"
        "real = mu.safe_save_file\n"
        "def save(t, f, **k):\n"
        "    real(t, f, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
        "mu.safe_save_file = save\n"
        "from llamaft.cli import main\n"
        f"main(['merge', {str(run)!r}, '--out', {str(out)!r}, '--dtype', 'float32'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == -9, stderr
    leftovers = hidden(tmp_path)
    assert leftovers == [f".merged.tmp-{proc.pid}"] and not out.exists()
    assert (tmp_path / leftovers[0] / "model.safetensors").stat().st_size > 100_000  # model-sized
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


# -- export --format hf -------------------------------------------------------------------------


@pytest.mark.usefixtures("no_model_load")
def test_export_hf_out_unusable(run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["export", str(run), "--format", "hf", "--out", str(f / "hf")]) == 2
    one_error_line(capsys.readouterr().err, "export", str(f / "hf"), "is a file, not a directory")
    with readonly_dir(tmp_path) as ro:
        assert main(["export", str(run), "--format", "hf", "--out", str(ro / "hf")]) == 2
        one_error_line(capsys.readouterr().err, "export", str(ro / "hf"), "cannot write in")


def test_export_hf_of_a_model_dir_disk_full(run, tmp_path, capsys):
    """A model directory re-saved (not merged) onto a full disk."""
    model = tmp_path / "model"
    assert main(["merge", str(run), "--out", str(model), "--dtype", "float32"]) == 0
    with tiny_disk(tmp_path) as disk:
        capsys.readouterr()
        assert main(["export", str(model), "--format", "hf", "--out", str(disk / "hf"), "--dtype", "float16"]) == 2
        one_error_line(capsys.readouterr().err, "export", str(disk / "hf"), "No space left on device")
        assert list(disk.iterdir()) == []


# -- export --format gguf -----------------------------------------------------------------------


def _without_quantizer(monkeypatch, tmp_path):
    import builtins

    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no llama-quantize
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "llama_cpp" else real_import(name, *a, **k))


def test_kquant_without_quantizer_fails_before_the_merge(tmp_path, monkeypatch, capsys):
    """`export RUN --quant q4_k_m` without llama-quantize: one line, no merge, RUN/merged untouched."""
    run = make_run_dir(tmp_path)
    merged = run / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    before = _tree(merged)
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    _without_quantizer(monkeypatch, tmp_path)
    import llamaft.model.merged as merged_mod

    monkeypatch.setattr(merged_mod, "load_for_inference", lambda *a, **k: pytest.fail("merged before checking --quant"))
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--quant", "q4_k_m"]) == 2
    one_error_line(capsys.readouterr().err, "export", "q4_k_m", "llama-quantize")
    assert _tree(merged) == before and (merged / "model.safetensors").stat().st_mtime_ns == stamp
    assert hidden(run) == [] and not list(run.glob("*.gguf"))
    assert main(["export", str(run), "--format", "gguf", "--quant", "q9_x"]) == 2
    one_error_line(capsys.readouterr().err, "export", "--quant q9_x: unknown GGUF outtype")


@pytest.mark.usefixtures("no_model_load")
def test_gguf_out_is_a_dir_of_a_file_or_unwritable(run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["export", str(run), "--format", "gguf", "--out", str(f / "m.gguf")]) == 2
    one_error_line(capsys.readouterr().err, "export", f"--out {f / 'm.gguf'}", "is a file, not a directory")
    with readonly_dir(tmp_path) as ro:
        assert main(["export", str(run), "--format", "gguf", "--out", str(ro / "m.gguf")]) == 2
        one_error_line(capsys.readouterr().err, "export", f"--out {ro / 'm.gguf'}", "cannot write in")


def test_gguf_failing_after_the_merge_keeps_the_previous_merged_dir(tmp_path, capsys):
    """The GGUF conversion fails after the run was merged (here: the tiny test tokenizer's
    pre-tokenizer is not one llama.cpp knows). RUN/merged still holds the previous merge, bit for
    bit, and no staging directory or partial .gguf remains."""
    run = make_run_dir(tmp_path)
    merged = run / "merged"
    assert main(["merge", str(run), "--out", str(merged), "--dtype", "float32"]) == 0
    (merged / "marker.txt").write_text("previous merge")
    before = _tree(merged)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16", "--no-check"]) == 2
    one_error_line(capsys.readouterr().err, "export", "pre-tokenizer")
    assert _tree(merged) == before
    assert hidden(run) == [] and not list(run.glob("*.gguf"))


@pytest.fixture(scope="module")
def smol_model(tmp_path_factory):
    from gguf_helpers import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("smol") / "merged", "smollm2")


def test_gguf_disk_full_keeps_the_previous_file(smol_model, tmp_path, monkeypatch, capsys):
    import gguf

    out = tmp_path / "m.gguf"
    assert main(["export", str(smol_model), "--format", "gguf", "--out", str(out), "--no-check", "--ollama"]) == 0
    before = out.read_bytes()
    modelfile = (tmp_path / "Modelfile").read_text()
    calls = []

    def full(self, *a, **k):  # the header went out, then the disk fills on the third tensor
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    capsys.readouterr()
    assert main(["export", str(smol_model), "--format", "gguf", "--out", str(out), "--no-check", "--ollama"]) == 2
    assert one_error_line(capsys.readouterr().err, "export", str(out)).endswith(
        f"{out}: write failed: No space left on device; nothing was written")
    assert out.read_bytes() == before and (tmp_path / "Modelfile").read_text() == modelfile
    assert hidden(tmp_path) == []


def test_gguf_on_a_really_full_disk(smol_model, tmp_path, capsys):
    with tiny_disk(tmp_path, "1m") as disk:
        capsys.readouterr()
        assert main(["export", str(smol_model), "--format", "gguf", "--out", str(disk / "m.gguf"), "--no-check"]) == 2
        one_error_line(capsys.readouterr().err, "export", str(disk / "m.gguf"), "No space left on device")
        assert list(disk.iterdir()) == []


def test_gguf_stale_temp_files_are_removed(smol_model, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = [tmp_path / f".m.gguf.{p.pid}.tmp", tmp_path / f".m.gguf.{p.pid}.f16.tmp"]
    for s in stale:
        s.write_bytes(b"\0" * 1000)
    assert main(["export", str(smol_model), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--no-check"]) == 0
    assert hidden(tmp_path) == [] and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


# -- data --dump and train.output_dir ------------------------------------------------------------


def _data_config(tmp_path, output_dir=None):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "Hi", "answer": "Hello"}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: meta-llama/Llama-3.1-8B-Instruct\n  tokenizer: llama3.1\n"
                   f"data:\n  train: [{data}]\n  format: qa\n  val_ratio: 0\n"
                   f"train:\n  output_dir: {output_dir or tmp_path / 'run'}\n")
    return cfg


@pytest.fixture
def no_tokenizer_load(monkeypatch):
    import llamaft.model.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded before --dump was checked"))


@pytest.mark.usefixtures("no_tokenizer_load")
def test_data_dump_into_a_directory_or_unwritable_place(tmp_path, capsys):
    cfg = _data_config(tmp_path)
    assert main(["data", str(cfg), "--dump", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err, "data", f"--dump {tmp_path}: is a directory")
    assert line.endswith(f"give a file name such as {tmp_path / 'train.jsonl'}")
    with readonly_dir(tmp_path) as ro:
        assert main(["data", str(cfg), "--dump", str(ro / "d.jsonl")]) == 2
        one_error_line(capsys.readouterr().err, "data", f"--dump {ro / 'd.jsonl'}", f"cannot write in {ro}")


def test_data_dump_disk_full(tmp_path, monkeypatch, capsys):
    import builtins

    from llamaft.data import inspect

    cfg = _data_config(tmp_path)
    dump = tmp_path / "out" / "d.jsonl"
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(inspect, "open", lambda p, *a, **k: Full(real_open(p, *a, **k)), raising=False)
    assert main(["data", str(cfg), "--dump", str(dump), "--show", "0"]) == 2
    one_error_line(capsys.readouterr().err, "data", f"--dump {dump}: write failed: No space left on device")
    assert not dump.exists() and hidden(dump.parent) == []


def test_train_output_dir_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a directory")
    cfg = _data_config(tmp_path, output_dir=f)
    assert main(["train", str(cfg)]) == 2
    one_error_line(capsys.readouterr().err, "train", f"train.output_dir={f}: exists and is not a directory")
    assert f.read_text() == "not a directory"
    assert main(["train", str(cfg), f"train.output_dir={f / 'sub'}"]) == 2
    one_error_line(capsys.readouterr().err, "train", f"train.output_dir={f / 'sub'}: {f} is a file, not a directory")
