"""Run directories that travel (train/portable.py): config.yaml paths that hold from any working
directory and after the run is moved; eval's rows copied into RUN/data/ exactly as training held them out."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llamaft.config import load_config, read_sources
from llamaft.data.pipeline import split_conversations
from llamaft.eval.evaluate import read_split_rows, run_sets
from llamaft.train import portable
from llamaft.train.portable import model_name, plan_copies, save_run_config


def _rows(n, seed=0):
    return [{"question": f"q{seed} {i}", "answer": f"a{i % 3}"} for i in range(n)]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _project(root: Path, data: dict, model: str = "meta-llama/Llama-3.1-8B-Instruct") -> Path:
    """root/data/train.jsonl (+ whatever `data` names), root/run.yaml with the paths as written (relative)."""
    _jsonl(root / "data" / "train.jsonl", _rows(20))
    cfg = {"model": {"name": model}, "data": {"train": ["data/train.jsonl"], "format": "qa", **data},
           "train": {"output_dir": "runs/r"}}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root / "run.yaml"


def _save(root: Path, monkeypatch, budget=None):
    """As `llamaft train` in `root` would: the config read there (relative paths), its splits, the snapshot."""
    monkeypatch.chdir(root)
    cfg = load_config("run.yaml")
    if budget is not None:
        monkeypatch.setattr(portable, "COPY_BUDGET", budget)
    run = root / "runs" / "r"
    run.mkdir(parents=True, exist_ok=True)
    splits = split_conversations(cfg.data)
    save_run_config(cfg, run, splits)
    return cfg, run, splits


def test_config_yaml_names_copies_in_the_run_and_absolute_paths(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _jsonl(a / "data" / "alpha_val.jsonl", _rows(3, 1))
    _jsonl(a / "other" / "alpha_val.jsonl", _rows(4, 2))  # same file name: the copy gets another
    _jsonl(a / "data" / "test.jsonl", _rows(2, 3))
    (a / "tmpl.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    _project(a, {"validation": {"alpha": "data/alpha_val.jsonl", "beta": "other/alpha_val.jsonl"},
                 "test": "data/test.jsonl", "chat_template": "tmpl.jinja"})
    _, run, _ = _save(a, monkeypatch)

    d = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert d["train"] == [str(a / "data" / "train.jsonl")]
    assert d["validation"] == {"alpha": "data/alpha_val.jsonl", "beta": "data/alpha_val-2.jsonl"}
    assert d["test"] == "data/test.jsonl" and d["chat_template"] == "data/tmpl.jinja"
    assert (run / "data" / "alpha_val-2.jsonl").read_text() == (a / "other" / "alpha_val.jsonl").read_text()
    sources = read_sources(run)
    assert sources["data/alpha_val-2.jsonl"] == {"origin": str(a / "other" / "alpha_val.jsonl"), "key": "data.validation.beta"}
    assert sources["data/tmpl.jinja"]["origin"] == str(a / "tmpl.jinja")

    # From another directory that has a data/ folder of its own, after the run moved: the run's copies.
    b = tmp_path / "B"
    _jsonl(b / "data" / "alpha_val.jsonl", _rows(9, 9))
    moved = tmp_path / "elsewhere" / "r"
    shutil.move(str(run), moved)
    monkeypatch.chdir(b)
    got = load_config(moved / "config.yaml", snapshot=True).data
    assert got.validation == {"alpha": str(moved / "data" / "alpha_val.jsonl"), "beta": str(moved / "data" / "alpha_val-2.jsonl")}
    assert got.test == str(moved / "data" / "test.jsonl") and got.chat_template == str(moved / "data" / "tmpl.jinja")
    # ... also when the run's config.yaml is a training config again (resume), and a copy that is gone
    # still resolves into the run, so its error names the run's path.
    (moved / "data" / "test.jsonl").unlink()
    assert load_config(moved / "config.yaml").data.test == str(moved / "data" / "test.jsonl")


def test_held_out_rows_are_the_rows_training_held_out(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _project(a, {"val_ratio": 0.25, "test_ratio": 0.2})
    cfg, run, splits = _save(a, monkeypatch)
    train = str(a / "data" / "train.jsonl")
    for split, rows in (("validation", splits.validation["validation"]), ("test", splits.test)):
        copied = read_split_rows(run / "data" / "split" / f"{split}.jsonl")
        assert [c.messages for c in copied] == [c.messages for c in rows] and len(rows) in (4, 5)
        # `where` names the training file absolutely: findable from any directory
        assert [c.where for c in copied] == [f"{a / c.where}" for c in rows] and copied[0].where.startswith(train + ":line ")
        assert read_sources(run)[f"data/split/{split}.jsonl"] == {"origin": train, "key": "data.train", "split": split,
                                                                  "rows": len(rows)}
    snap = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert snap["train"] == [train] and snap["val_ratio"] == 0.25 and snap["validation"] is None  # training unchanged

    # eval's rows: from the copy, identical to the split taken again from data.train (older runs)
    monkeypatch.chdir(tmp_path)
    stored = load_config(run / "config.yaml", snapshot=True)
    from_copy = run_sets(stored, run, run)["test"]
    shutil.rmtree(run / "data")
    rebuilt = run_sets(stored, run, run)["test"]
    assert from_copy == rebuilt
    (a / "data" / "train.jsonl").unlink()
    with pytest.raises(Exception, match=f"{train}: file not found .*data.train in .*config.yaml.*--data FILE"):
        run_sets(stored, run, run)


def test_large_sets_stay_where_they_are(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _jsonl(a / "data" / "big_val.jsonl", _rows(50, 4))
    _project(a, {"validation": "data/big_val.jsonl", "test_ratio": 0.2})
    _, run, _ = _save(a, monkeypatch, budget=10)
    d = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert d["validation"] == str(a / "data" / "big_val.jsonl")  # absolute: works from anywhere on this machine
    assert not (run / "data").exists()  # nothing copied: no manifest either


def test_validation_directory_copies_its_val_files(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _jsonl(a / "vals" / "x_val.jsonl", _rows(2, 5))
    _jsonl(a / "vals" / "y_val.jsonl", _rows(2, 6))
    _jsonl(a / "vals" / "notes.jsonl", _rows(2, 7))  # not a validation file: not copied
    _project(a, {"validation": "vals"})
    _, run, _ = _save(a, monkeypatch)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["validation"] == "data/vals"
    assert sorted(p.name for p in (run / "data" / "vals").iterdir()) == ["x_val.jsonl", "y_val.jsonl"]
    monkeypatch.chdir(tmp_path)
    sets = run_sets(load_config(run / "config.yaml", snapshot=True), run, run)
    assert list(sets) == ["x_val", "y_val"] and [c.messages[0]["content"] for c in sets["x_val"]] == ["q5 0", "q5 1"]


def test_a_data_folder_of_the_users_in_output_dir_is_left_alone(tmp_path, monkeypatch, capsys):
    a = tmp_path / "A"
    _jsonl(a / "data" / "v_val.jsonl", _rows(2, 8))
    _project(a, {"validation": "data/v_val.jsonl"})
    (a / "run.yaml").write_text((a / "run.yaml").read_text().replace("runs/r", "."))
    monkeypatch.chdir(a)
    cfg = load_config("run.yaml")
    save_run_config(cfg, a, split_conversations(cfg.data))
    assert sorted(p.name for p in (a / "data").iterdir()) == ["train.jsonl", "v_val.jsonl"]
    assert yaml.safe_load((a / "config.yaml").read_text())["data"]["validation"] == str(a / "data" / "v_val.jsonl")
    assert "is not llamaft's" in capsys.readouterr().out


def test_a_resumed_run_keeps_its_copies_and_their_origins(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _jsonl(a / "data" / "v_val.jsonl", _rows(2, 8))
    _project(a, {"validation": "data/v_val.jsonl", "test_ratio": 0.2})
    _, run, _ = _save(a, monkeypatch)
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in (run / "data").rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)  # `llamaft train A/runs/r/config.yaml train.resume=true` from elsewhere
    cfg = load_config(run / "config.yaml", ["train.resume=true"])
    save_run_config(cfg, run, split_conversations(cfg.data))
    after = {p.relative_to(run).as_posix(): p.read_bytes() for p in (run / "data").rglob("*") if p.is_file()}
    assert after == before
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["validation"] == "data/v_val.jsonl"


def test_model_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "SmolLM2-135M-Instruct-hf").mkdir(parents=True)
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_name(str(tmp_path / "cache" / "SmolLM2-135M-Instruct-hf")) == "embedded:smollm2"
    assert model_name("embedded:smollm2") == "embedded:smollm2"
    assert model_name("models/m") == str(tmp_path / "models" / "m")
    assert model_name("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_plan_copies_puts_held_out_rows_first(tmp_path, monkeypatch):
    a = tmp_path / "A"
    _jsonl(a / "data" / "t.jsonl", _rows(30, 3))
    _project(a, {"test": "data/t.jsonl"})
    monkeypatch.chdir(a)
    cfg = load_config("run.yaml")
    splits = split_conversations(cfg.data)
    everything = plan_copies(cfg, a / "runs" / "r", splits)
    sizes = {c.rel: len(c.text.encode()) if c.text is not None else c.source.stat().st_size for c in everything}
    assert list(sizes) == ["data/split/validation.jsonl", "data/t.jsonl"]
    only_split = plan_copies(cfg, a / "runs" / "r", splits, budget=sizes["data/split/validation.jsonl"])
    assert [c.rel for c in only_split] == ["data/split/validation.jsonl"]


# ---------------------------------------------------------------------------------------------
# End to end: `llamaft train` in one directory, every later command from another, then after a move


def _llamaft(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "llamaft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _tiny_project(a: Path) -> None:
    from inference_helpers import save_model_dir, tiny_model, tiny_rules, tiny_tokenizer

    tok = tiny_tokenizer()
    save_model_dir(tiny_model(vocab_size=len(tok)), tok, tiny_rules(tok), a / "base")
    _jsonl(a / "data" / "train.jsonl", [{"question": f"is {c} {i}", "answer": ["yes", "no"][i % 2]}
                                        for i, c in enumerate("abcdefghijklmnopqrstuvwx")])
    _jsonl(a / "data" / "alpha_val.jsonl", [{"question": "is z", "answer": "no"}])
    cfg = {"model": {"name": "base", "dtype": "float32"}, "lora": {"r": 4, "alpha": 8},
           "data": {"train": ["data/train.jsonl"], "validation": "data/alpha_val.jsonl", "test_ratio": 0.25},
           "train": {"output_dir": "runs/r", "max_steps": 2, "micro_batch_size": 4, "eval_every": 0, "save_every": 0,
                     "report_to": []},
           "eval": {"generation": {"*": {"max_new_tokens": 3, "metrics": ["exact_match"]}}},
           "fast": {"enabled": False}}
    (a / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")


def _say_then_eof(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


def _predictions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_a_run_works_from_another_directory_and_after_a_move(tmp_path, monkeypatch, capsys):  # ~1 min
    from llamaft.chat.terminal import chat_loop
    from llamaft.cli import main

    a, b = tmp_path / "A", tmp_path / "B"
    b.mkdir()
    _tiny_project(a)
    trained = _llamaft("train", "run.yaml", cwd=a)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = a / "runs" / "r"
    # The bug report: eval --compare-base from another directory (in this process, from B).
    monkeypatch.chdir(b)
    assert main(["eval", str(run), "--compare-base"]) == 0
    in_place = _predictions(run)
    assert len(in_place) == 6 and {r["set"] for r in in_place} == {"test"}
    assert all(r["where"].startswith(f"{a / 'data' / 'train.jsonl'}:line ") for r in in_place)

    assert main(["merge", str(run), "--out", "merged", "--dtype", "float32"]) == 0
    assert main(["export", str(run), "--format", "hf", "--out", "hf"]) == 0
    assert (b / "merged" / "config.json").is_file() and (b / "hf" / "config.json").is_file()
    lines = iter(["is a"])

    history = chat_loop(run, temperature=0, max_new_tokens=3, input_fn=lambda p: _say_then_eof(lines), out=io.StringIO())
    assert [m["role"] for m in history] == ["user", "assistant"]

    # Moved elsewhere, the training data gone: eval scores the same rows with the same answers.
    moved = tmp_path / "C" / "moved"
    moved.parent.mkdir()
    shutil.move(str(run), moved)
    shutil.rmtree(a / "data")
    shutil.rmtree(moved / "eval")
    assert main(["eval", str(moved), "--compare-base"]) == 0
    assert _predictions(moved) == in_place
    assert main(["merge", str(moved), "--out", "merged2", "--dtype", "float32"]) == 0
    capsys.readouterr()

    # A copy that is gone: one line naming the original and --data.
    (moved / "data" / "split" / "test.jsonl").unlink()
    assert main(["eval", str(moved)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(a / "data" / "train.jsonl") in err[0] and "--data FILE" in err[0], err
    other = _jsonl(b / "other.jsonl", [{"question": "is q", "answer": "yes"}])
    assert main(["eval", str(moved), "--data", str(other)]) == 0
    assert [r["set"] for r in _predictions(moved)] == ["other"]
    capsys.readouterr()

    # The base model moved too: one line saying where config.yaml looks and what to edit.
    (a / "base").rename(a / "base-moved")
    assert main(["merge", str(moved), "--out", "merged3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model.name: {a / 'base'} not found" in err[0] and str(moved / "config.yaml") in err[0], err
    assert not (b / "merged3").exists()
