"""`llamaft demo` end to end on the embedded SmolLM2-135M-Instruct: the base model gets the held-out
bookings wrong, the tuned one right, the stages say how long they take, and the report shows it."""

import json
import re

import pytest

from llamaft.cli import main
from llamaft.demo import STAGE_SECONDS, Stages, clock, stage_names
from llamaft.demo_data import GENERAL_QUESTION, N_TRAIN, N_VAL, demo_rows, write_demo_data


@pytest.mark.slow
def test_demo_teaches_the_format_keeps_the_knowledge_and_reports(tmp_path, capsys):
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", str(out), "--no-export"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"]["bookings_val"], summary["after"]["bookings_val"]
    # the base model answers in prose; the tuned one with exactly the record, on held-out names
    assert before["exact_match"] <= 0.2 and after["exact_match"] >= 0.9, (before, after)
    assert after["loss"] < before["loss"] and after["stops_on_eos"] >= 0.9
    assert after["samples"] == N_VAL
    # every stage is announced with its elapsed time and what is left, and recorded in summary.json
    stages = summary["demo"]["stages_s"]
    assert list(stages) == [n for n in STAGE_SECONDS if n not in ("export GGUF", "prepare the embedded model (once)")]
    for i, name in enumerate(stages):
        assert re.search(rf"\[{i + 1}/{len(stages)}\] {re.escape(name)} · \d+:\d\d elapsed · ~\d+:\d\d left", printed)
    assert sum(stages.values()) <= summary["demo"]["total_s"] + 1
    # the chat stage: new bookings in the format, and a question outside the task still answered
    assert '{"name": "Rosa", "people": 5, "time": "8pm", "day": "Thursday"}' in printed
    assert "Paris" in printed.split(GENERAL_QUESTION, 1)[1]
    report = (out / "report.md").read_text()
    assert f"{after['loss']:.4g}" in report  # the report's number format (4 significant digits)
    assert (out / "merged" / "model.safetensors").is_file()
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    # SmolLM2-Instruct stops on its turn end <|im_end|> (id 2) alone; pad is <repo_name> (id 3), a
    # spare special token that is not a stop id
    assert gen["eos_token_id"] == [2] and gen["pad_token_id"] == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    assert tok.convert_ids_to_tokens([2, 3]) == ["<|im_end|>", "<repo_name>"]
    preds = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == N_VAL and all("prediction" in p and "reference" in p for p in preds)


def test_stage_lines_give_elapsed_time_and_an_estimate_scaled_by_this_machines_pace():
    from rich.console import Console

    now = [0.0]
    console = Console(record=True, width=200)
    names = ["fine-tune (LoRA)", "merge", "chat with the merged model"]
    stages = Stages(console, names, clock=lambda: now[0])
    stages.start("fine-tune (LoRA)")
    now[0] = 2 * STAGE_SECONDS["fine-tune (LoRA)"]  # this machine is twice as slow as the reference
    stages.start("merge")
    stages.finish()
    text = console.export_text()
    first_left = sum(STAGE_SECONDS[n] for n in names)
    assert f"[1/3] fine-tune (LoRA) · 0:00 elapsed · ~{clock(first_left)} left" in text
    second_left = 2 * (STAGE_SECONDS["merge"] + STAGE_SECONDS["chat with the merged model"])
    assert f"[2/3] merge · {clock(now[0])} elapsed · ~{clock(second_left)} left" in text
    assert stages.seconds == {"fine-tune (LoRA)": now[0], "merge": 0.0}


def test_stage_names_follow_the_options():
    assert stage_names(prepare=True, export=True, chat=True) == list(STAGE_SECONDS)
    assert stage_names(prepare=False, export=False, chat=False) == [
        "fine-tune (LoRA)", "evaluate the tuned model", "evaluate the base model", "merge"]


def test_demo_data_holds_out_names_and_is_deterministic(tmp_path):
    rows = demo_rows()
    assert len(rows["train"]) == N_TRAIN and len(rows["bookings_val"]) == N_VAL
    name = lambda row: json.loads(row["answer"])["name"]  # noqa: E731
    assert not {name(r) for r in rows["train"]} & {name(r) for r in rows["bookings_val"]}
    for row in rows["train"] + rows["bookings_val"]:  # every value is in the message: a pure format task
        record = json.loads(row["answer"])
        assert list(record) == ["name", "people", "time", "day"]
        assert all(str(v) in row["question"] for v in record.values()), row
    paths = write_demo_data(tmp_path)
    assert [json.loads(line) for line in paths["bookings_val"].read_text().splitlines()] == demo_rows()["bookings_val"]


def test_a_second_demo_replaces_its_own_previous_run_and_nothing_else(tmp_path, capsys):
    from llamaft.demo import MARKER, demo_data_dir, fresh_demo_dir

    out = tmp_path / "runs" / "demo"
    assert fresh_demo_dir(out) == out and (out / MARKER).is_file()
    (out / "summary.json").write_text("{}")
    demo_data_dir(out).mkdir()
    (demo_data_dir(out) / "train.jsonl").write_text("{}\n")
    fresh_demo_dir(out)  # the rerun: the old run and its data are gone, a fresh marked directory remains
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and not demo_data_dir(out).exists()

    mine = tmp_path / "my-run"
    mine.mkdir()
    (mine / "summary.json").write_text('{"keep": true}')
    capsys.readouterr()
    assert main(["demo", "--out", str(mine)]) == 2  # refused before the model is prepared
    err = capsys.readouterr().err
    assert err.startswith(f"llamaft demo: error: --out {mine}: exists and is not a llamaft demo run") and err.count("\n") == 1
    assert (mine / "summary.json").read_text() == '{"keep": true}'
