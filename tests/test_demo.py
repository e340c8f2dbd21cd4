"""`llamaft demo` end to end on the embedded SmolLM2-135M-Instruct: it must measure a real
improvement (validation loss after < before, on held-out countries) and write the report showing it."""

import json

import pytest

from llamaft.cli import main


@pytest.mark.slow
def test_demo_improves_and_reports(tmp_path):
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", str(out), "--no-chat"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"]["capitals_val"], summary["after"]["capitals_val"]
    assert after["loss"] < before["loss"], (before, after)
    # the base model answers in chatty sentences; the tuned one answers with the city alone
    assert after["exact_match"] > before["exact_match"]
    assert after["stops_on_eos"] >= 0.9
    report = (out / "report.md").read_text()
    assert f"{after['loss']:.3f}" in report or f"{after['loss']:.4f}" in report
    assert (out / "merged" / "model.safetensors").is_file()
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    # SmolLM2-Instruct stops on its turn end <|im_end|> (id 2) alone; pad is <repo_name> (id 3), a
    # spare special token that is not a stop id
    assert gen["eos_token_id"] == [2] and gen["pad_token_id"] == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    assert tok.convert_ids_to_tokens([2, 3]) == ["<|im_end|>", "<repo_name>"]
    preds = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and all("prediction" in p and "reference" in p for p in preds)


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
