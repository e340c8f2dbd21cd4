"""Every bad input: one line `llamaft CMD: error: ...` naming the file / row / key / path, exit code 2,
no traceback, and nothing created (no run directory, no dump file).

The table runs the CLI in-process (`main([...])`, seconds for the whole table) on a tiny saved Llama
(byte-level tokenizer, 262 ids); one case also runs as a real subprocess. The model never loads:
every case fails before weights are read (the checks run on the meta device).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from llamaft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from inference_helpers import save_model_dir, tiny_model, tiny_rules, tiny_tokenizer

    tok = tiny_tokenizer()
    return save_model_dir(tiny_model(vocab_size=len(tok)), tok, tiny_rules(tok), tmp_path_factory.mktemp("m") / "tiny")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _config(tmp, model_dir, *, model=None, data=None, train=None, lora=None, eval=None, text=None) -> str:
    """A run config (YAML) over the tiny model and 8 good rows; sections are merged over the defaults."""
    path = tmp / "run.yaml"
    if text is not None:
        path.write_text(text.format(train=_jsonl(tmp / "train.jsonl", QA), model=model_dir, out=tmp / "run"), encoding="utf-8")
        return str(path)
    raw = {
        "model": {"name": str(model_dir), "dtype": "float32", **(model or {})},
        "lora": {"r": 4, "alpha": 8, **(lora or {})},
        "data": {"train": [_jsonl(tmp / "train.jsonl", QA)], "val_ratio": 0.25, **(data or {})},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 1, "report_to": [], **(train or {})},
        "fast": {"enabled": False},
    }
    if eval:
        raw["eval"] = eval
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return str(path)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# Each case: (tmp, model_dir) -> (argv, [fragments the one error line must contain]).
CASES = {
    # -- config and overrides
    "unknown key": lambda t, m: (["train", _config(t, m, data={"max_seq_len": 64})],
                                 ["unknown key 'data.max_seq_len'", "did you mean 'data.max_seq_length'"]),
    "bad override value": lambda t, m: (["train", _config(t, m), "train.learning_rate=fast"], ["'train.learning_rate'", "'fast'"]),
    "override of an unknown section": lambda t, m: (["train", _config(t, m), "trian.max_steps=3"], ["unknown key 'trian'"]),
    "not key=value": lambda t, m: (["train", _config(t, m), "lora"], ["override 'lora' is not key=value"]),
    "max_steps 0": lambda t, m: (["train", _config(t, m), "train.max_steps=0"], ["'train.max_steps'", "positive", "(got 0)"]),
    "max_steps negative": lambda t, m: (["train", _config(t, m, train={"max_steps": -5})], ["'train.max_steps'", "(got -5)"]),
    "on/off switch with another word": lambda t, m: (["train", _config(t, m), "data.packing=maybe"], ["'data.packing'", "'maybe'"]),
    "'on' where only auto/off exist": lambda t, m: (["train", _config(t, m), "fast.regroup_batches=on"], ["'fast.regroup_batches'", "'on'"]),
    "duplicate YAML key": lambda t, m: (["train", _config(t, m, text=(
        "model: {{name: '{model}'}}\ndata:\n  train: ['{train}']\n  validation:\n    a: '{train}'\n    a: other.jsonl\n"
        "train: {{output_dir: '{out}'}}\n"))], ["run.yaml:line 6: key 'data.validation.a' appears twice", "other.jsonl"]),
    "config file missing": lambda t, m: (["train", str(t / "nope.yaml")], ["nope.yaml: config file not found"]),
    # -- data
    "malformed JSONL": lambda t, m: (["train", _config(t, m, data={"train": [_write(t / "bad.jsonl", '{"question": "a", "answer": "b"}\n{"question": \n')]})],
                                     ["bad.jsonl:line 2", "malformed JSON"]),
    "missing column": lambda t, m: (["train", _config(t, m, data={"format": "qa", "train": [_jsonl(t / "col.jsonl", QA[:3] + [{"question": "x", "reply": "y"}])]})],
                                    ["col.jsonl:line 4", "'answer'"]),
    "JSON file holding one object": lambda t, m: (["train", _config(t, m, data={"train": [_write(t / "one.json", json.dumps(QA[0]))]})],
                                                  ["one.json: a .json file must hold a list of rows", ".jsonl"]),
    "unterminated CSV quote": lambda t, m: (["train", _config(t, m, data={"train": [_write(t / "t.csv", 'question,answer\nq1,a1\nq2,"a2\nq3,a3\n')]})],
                                            ["t.csv:line 3", "never closed"]),
    "too few rows to hold out": lambda t, m: (["train", _config(t, m, data={"train": [_jsonl(t / "two.jsonl", QA[:1])], "val_ratio": 0.5})],
                                              ["two.jsonl", "only 1 row"]),
    "validation list, two files one name": lambda t, m: (["train", _config(t, m, data={"validation": [
        _jsonl(t / "x_val.jsonl", QA), _jsonl((t / "b").mkdir() or t / "b" / "x_val.jsonl", QA)]})],
        ["two validation sets named 'x_val'", str(t / "x_val.jsonl"), str(t / "b" / "x_val.jsonl")]),
    "validation dir, two files one name": lambda t, m: (["train", _config(t, m, data={"validation": (
        (t / "v").mkdir(), _jsonl(t / "v" / "a_val.json", QA), _jsonl(t / "v" / "a_val.jsonl", QA), str(t / "v"))[-1]})],
        ["two validation sets named 'a_val'", "a_val.json ", "a_val.jsonl"]),
    # -- model
    "missing relative model dir": lambda t, m: (["train", _config(t, m, model={"name": "./models/foo"})],
                                                ["model.name: no such local directory or file: ./models/foo"]),
    "missing absolute model dir": lambda t, m: (["train", _config(t, m, model={"name": str(t / "abs" / "model")})],
                                                [f"no such local directory or file: {t / 'abs' / 'model'}"]),
    "hub id while offline": lambda t, m: (["train", _config(t, m, model={"name": "someone/some-model"})],
                                          ["model.name 'someone/some-model' is not a local directory or file and the hub is offline"]),
    "run-like path while offline": lambda t, m: (["train", _config(t, m, model={"name": "runs/x"})],
                                                 ["model.name 'runs/x' is not a local directory or file"]),
    "path under an existing directory": lambda t, m: (["train", _config(t, m, model={"name": "runs/nope"}), (t / "runs").mkdir()][:2],
                                                      ["model.name 'runs/nope' is not a local directory or file (runs/ exists but holds no 'nope')"]),
    "missing GGUF": lambda t, m: (["train", _config(t, m, model={"name": str(t / "m.gguf")})], ["model.name: GGUF file not found", "m.gguf"]),
    "directory without config.json": lambda t, m: (["train", _config(t, m, model={"name": str(t), "tokenizer": str(m)})],
                                                   [f"model.name '{t}': cannot read the model's config", "config.json"]),
    "tokenizer of another model": lambda t, m: (["train", _config(t, m, model={"tokenizer": "llama3.1"})],
                                                ["model.tokenizer=llama3.1 has 128,256 ids", "262 embedding rows", "remove model.tokenizer"]),
    "bogus lora.target_modules": lambda t, m: (["train", _config(t, m, lora={"target_modules": ["q_proj", "v_prj"]})],
                                               ["lora.target_modules: no module named 'v_prj'", "did you mean 'v_proj'"]),
    "target_modules naming a block": lambda t, m: (["train", _config(t, m, lora={"target_modules": ["mlp"]})],
                                                   ["lora.target_modules: 'mlp' names LlamaMLP modules"]),
    # -- eval
    "eval.generation unknown set": lambda t, m: (["train", _config(t, m, eval={"generation": {"valdiation": {"metrics": ["exact_match"]}}})],
                                                 ["eval.generation.valdiation: no validation set named 'valdiation'", "sets: validation"]),
    "eval.generation unknown metric": lambda t, m: (["train", _config(t, m, eval={"generation": {"*": {"metrics": ["exact_mach"]}}})],
                                                    ["eval.generation.*.metrics: eval metric 'exact_mach': did you mean 'exact_match'?"]),
    "eval.generation unimportable metric": lambda t, m: (["train", _config(t, m, eval={"generation": {"validation": {"metrics": ["nosuchmod_xyz:f"]}}})],
                                                         ["eval.generation.validation.metrics: eval metric 'nosuchmod_xyz:f': cannot import 'nosuchmod_xyz'"]),
    # -- export and chat
    "export --quant q4_k_m without llama.cpp": lambda t, m: (["export", str(m), "--format", "gguf", "--quant", "q4_k_m", "--out", str(t / "out" / "m.gguf")],
                                                              ["--quant q4_k_m needs llama.cpp's quantizer"]),
    "export --quant unknown": lambda t, m: (["export", str(m), "--format", "gguf", "--quant", "q3_x", "--out", str(t / "out" / "m.gguf")],
                                            ["--quant q3_x: unknown GGUF outtype"]),
    "chat a missing .gguf": lambda t, m: (["chat", str(t / "nope.gguf")], [f"{t / 'nope.gguf'}: no such GGUF file"]),
    # -- command line
    "data --show -1": lambda t, m: (["data", _config(t, m), "--show", "-1", "--dump", str(t / "dump.jsonl")], ["argument --show", "-1"]),
    "unknown option": lambda t, m: (["train", _config(t, m), "--max-steps", "3"], ["unrecognized arguments: --max-steps 3"]),
}


def _llama_cpp() -> bool:
    from llamaft.export.gguf_check import llama_cpp_available

    return llama_cpp_available()


if not _llama_cpp() and not shutil.which("llama-quantize"):
    CASES["chat a .gguf without llama.cpp"] = lambda t, m: (["chat", _write(t / "m.gguf", "GGUF")], [
        "m.gguf: chatting with a GGUF needs llama.cpp's Python binding", "chat with the run or merged model directory"])
else:  # the export case needs neither quantizer present
    del CASES["export --quant q4_k_m without llama.cpp"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the cases (./models/foo, runs/x) resolve here
    argv, fragments = CASES[case](tmp_path, model_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llamaft {argv[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "dump.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing else written either


def test_subprocess_hub_id_offline_is_fast_and_one_line(tmp_path, model_dir):
    """The real command, as a user runs it: no traceback, no retries (HF_HUB_OFFLINE=1 from conftest)."""
    argv, fragments = CASES["hub id while offline"](tmp_path, model_dir)
    proc = subprocess.run([sys.executable, "-m", "llamaft", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("llamaft train: error: ") and fragments[0] in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    """Online mode with no network: one model_info request, no retries, one line."""
    from huggingface_hub import HfApi

    from llamaft.errors import LlamaftError
    from llamaft.model import source

    monkeypatch.setattr(source, "hub_offline", lambda: False)

    def refuse(self, repo_id, **kwargs):
        assert kwargs.get("timeout") == source.HUB_TIMEOUT_S
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", refuse)
    with pytest.raises(LlamaftError) as err:
        source.check_source("someone/some-model", "model.name")
    assert str(err.value) == ("model.name 'someone/some-model' is not a local directory or file and the hub is unreachable "
                              "(ConnectionError: [Errno -2] Name or service not known); give a local model directory or .gguf file")


def test_overrides_after_options_and_on_off_words(tmp_path, model_dir, capsys):
    """`key=value` anywhere on the line; bare YAML on/off (booleans to YAML 1.1) where the docs say on/off."""
    from llamaft.config import load_config

    cfg = _config(tmp_path, model_dir)
    dump = tmp_path / "dump.jsonl"
    assert main(["data", cfg, "--dump", str(dump), "data.max_seq_length=64", "--show", "0", "data.val_ratio=0"]) == 0
    assert len(dump.read_text().splitlines()) == len(QA)
    assert main(["data", "data.val_ratio=0", cfg, "--show", "0"]) == 0  # before the config file, too
    capsys.readouterr()

    text = yaml.safe_load(open(cfg))
    text["data"]["packing"] = True  # what `packing: on` reads as
    text["fast"].update({"compile": False, "enabled": False})
    (tmp_path / "onoff.yaml").write_text(yaml.safe_dump(text).replace("packing: true", "packing: on").replace("compile: false", "compile: off"))
    c = load_config(tmp_path / "onoff.yaml", ["fast.fused_loss=off", "train.gradient_checkpointing=on", "fast.enabled=on"])
    assert (c.data.packing, c.fast.compile, c.fast.fused_loss, c.train.gradient_checkpointing) == ("on", "off", "off", "on")
    assert c.fast.enabled is True  # a real bool stays a bool
    assert load_config(cfg, ["train.max_steps=null"]).train.max_steps is None  # unset = train for epochs


def test_vocab_check_allows_padded_rows_and_requested_tokens_only():
    from llamaft.config import ModelConfig
    from llamaft.errors import LlamaftError
    from llamaft.model.preflight import check_vocab

    own, meta = ModelConfig(name="m"), ModelConfig(name="m", tokenizer="llama3.1")
    check_vocab(own, 128256, 128256)
    check_vocab(own, 151665, 152064)  # rows padded past the tokenizer (Qwen2.5-style): fine
    check_vocab(meta, 128256, 128264)
    check_vocab(own, 65, 64, n_added=1)  # model.add_pad_token added <|pad|>: one new row, on request
    with pytest.raises(LlamaftError, match="its tokenizer has 65 ids but the model has 64 embedding rows"):
        check_vocab(own, 65, 64)
    with pytest.raises(LlamaftError, match="model.tokenizer=llama3.1 has 128,256 ids but model 'm' has 151,936"):
        check_vocab(meta, 128256, 151936)  # far fewer ids than rows: another model's tokenizer


def test_old_run_snapshots_with_max_steps_minus_one_still_load(tmp_path):
    from llamaft.config import load_config
    from llamaft.errors import ConfigError

    snap = tmp_path / "config.yaml"
    snap.write_text("model: {name: m}\ndata: {train: [t.jsonl]}\ntrain: {max_steps: -1}\n")
    assert load_config(snap, snapshot=True).train.max_steps is None  # written before max_steps became optional
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(snap)  # as a user's config it is the mistake it looks like


def test_hub_id_in_the_offline_cache_still_works(tmp_path, model_dir):
    """HF_HUB_OFFLINE=1 with the repository in the hub cache: the check passes and the real loaders
    read the cached snapshot (a subprocess: huggingface_hub reads HF_HUB_CACHE at import)."""
    import os

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snap)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    cfg = _config(tmp_path, model_dir, model={"name": "someone/tiny"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llamaft", "data", cfg, "--show", "0"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tokens per example" in proc.stdout
