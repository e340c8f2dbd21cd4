"""The `llamaft` command: help for every command, one-line errors with exit code 2 and no traceback."""

import json
import subprocess
import sys

import pytest

from llamaft.cli import build_parser, main

COMMANDS = ["demo", "train", "data", "eval", "merge", "export", "chat", "sweep"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llamaft", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llamaft {command}")


def test_eval_data_takes_several_files():
    args = build_parser().parse_args(["eval", "runs/r", "--data", "a.jsonl", "b.jsonl", "--compare-base"])
    assert args.data == ["a.jsonl", "b.jsonl"] and args.compare_base and args.path == "runs/r"


def test_top_level_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in proc.stdout


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _config(tmp_path, train_file, extra=""):
    return _write(
        tmp_path / "run.yaml",
        f"model:\n  name: meta-llama/Llama-3.1-8B-Instruct\n  tokenizer: llama3.1\n"
        f"data:\n  train: [{train_file}]\n  format: qa\n{extra}"
        f"train:\n  output_dir: {tmp_path / 'run'}\n",
    )


def test_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    # in-process (a real process' one line and exit code: test_malformed_jsonl_names_file_and_line_before_loading_a_model)
    cfg = _config(tmp_path, "x.jsonl", extra="  max_seq_len: 12\n")
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"llamaft train: error: {cfg}: unknown key 'data.max_seq_len' (did you mean 'data.max_seq_length'?)"
    ]


def test_bad_override_names_the_key(tmp_path):
    cfg = _config(tmp_path, "x.jsonl")
    assert main(["train", str(cfg), "train.learning_rate=fast"]) == 2


def test_malformed_jsonl_names_file_and_line_before_loading_a_model(tmp_path):
    data = _write(tmp_path / "train.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n')
    cfg = _config(tmp_path, data)
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{data}:line 2" in lines[0]
    # validated before any model load: nothing was written to the run directory
    assert not (tmp_path / "run" / "adapter").exists()


def test_missing_column_names_row_and_field(tmp_path):
    data = _write(tmp_path / "train.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "reply": "d"}\n')
    cfg = _config(tmp_path, data)
    proc = run_cli("data", str(cfg))
    assert proc.returncode == 2
    assert f"{data}:line 2" in proc.stderr and "'answer'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_qlora_on_cpu_is_a_clear_error(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", '{"question": "a", "answer": "b"}\n' * 4)
    cfg = _config(tmp_path, data)
    assert main(["train", str(cfg), "model.method=qlora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]


def test_data_dump_matches_the_llama31_template(tmp_path):
    """`llamaft data --dump` writes exact ids: here checked against Meta's reference encoder."""
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    from llama_models.datatypes import RawMessage

    from llamaft.assets import llama3_tokenizer_file

    data = _write(tmp_path / "train.jsonl", json.dumps({"question": "Hi there", "answer": "Hello!"}) + "\n")
    cfg = _config(tmp_path, data, extra="  val_ratio: 0.0\n  date: 01 Jan 2025\n")
    dump = tmp_path / "dump.jsonl"
    assert main(["data", str(cfg), "--dump", str(dump), "--show", "1"]) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 1
    fmt = ChatFormat(Tokenizer(llama3_tokenizer_file()))
    system = "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n"
    dialog = [RawMessage(role="system", content=system), RawMessage(role="user", content="Hi there"),
              RawMessage(role="assistant", content="Hello!", stop_reason="end_of_turn")]
    ref = fmt.encode_dialog_prompt(dialog).tokens
    # Meta's encoder ends with an open assistant header for the next turn; the example ends at <|eot_id|>.
    assert rows[0]["input_ids"] == ref[: len(rows[0]["input_ids"])]
    assert rows[0]["input_ids"][-1] == 128009
    trained = [t for t, lab in zip(rows[0]["input_ids"], rows[0]["labels"]) if lab != -100]
    assert trained == fmt.tokenizer.encode("Hello!", bos=False, eos=False) + [128009]
