"""Preference rows: every shape, every bad row's one-line error, and token-exact encoding (Meta's
ChatFormat as the oracle for Llama 3.1), plus `llamaft data` showing and dumping both sides."""

import json
from pathlib import Path

import pytest

from llamaft.config import ColumnsConfig, config_from_dict
from llamaft.data.chat import IGNORE_INDEX, encode_pair, prompt_ids
from llamaft.data.inspect import inspect_data
from llamaft.data.pipeline import build_datasets, read_file, split_conversations
from llamaft.data.preference import check_objective_formats, to_pair
from llamaft.data.sources import Record
from llamaft.errors import DataError
from llamaft.model.tokenizer import make_rules, template_text

COLS = ColumnsConfig()
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}


def pair(row, where="p.jsonl:line 3"):
    return to_pair(Record(row, where), COLS)


def test_the_three_shapes_give_the_same_pair():
    text = pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    msgs = pair({"prompt": [U("Hi?")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]})
    convs = pair({"chosen": [U("Hi?"), A("Hello.")], "rejected": [U("Hi?"), A("Go away.")]})
    csv_cells = pair({"prompt": json.dumps([U("Hi?")]), "chosen": json.dumps([A("Hello.")]), "rejected": "Go away."})
    for p in (text, msgs, convs, csv_cells):
        assert (p.prompt, p.chosen, p.rejected) == ([U("Hi?")], A("Hello."), A("Go away."))
    assert text.messages == [U("Hi?"), A("Hello.")]  # generation metrics score against the chosen answer


def test_system_prompt_and_multi_turn_prefix():
    p = to_pair(Record({"prompt": "Hi?", "chosen": "a", "rejected": "b", "system": "Be brief."}, "x"), COLS, "ignored")
    assert p.prompt == [S("Be brief."), U("Hi?")]
    p = to_pair(Record({"prompt": "Hi?", "chosen": "a", "rejected": "b"}, "x"), COLS, "House style.")
    assert p.prompt[0] == S("House style.")
    conv = [U("one"), A("1"), U("two")]
    p = pair({"chosen": conv + [A("2")], "rejected": conv + [A("II")]})
    assert p.prompt == conv and p.chosen == A("2")


@pytest.mark.parametrize("row, field, what", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", "empty completion"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "rejected": "b", "chosen": None}, "chosen", "missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other q"), A("b")]}, "rejected[0]", "prompt differs"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("q"), U("b")]}, "rejected", "end with the assistant"),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "chosen", "no prompt"),
    ({"prompt": "q", "chosen": [U("x"), A("a")], "rejected": "b"}, "chosen", "one assistant message"),
    ({"prompt": [U("q"), A("a")], "chosen": "a", "rejected": "b"}, "prompt", "ends with an assistant"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "chosen[0].role", "unknown role"),
])
def test_bad_rows_name_file_row_and_field(row, field, what):
    with pytest.raises(DataError) as err:
        pair(row)
    line = str(err.value)
    assert line.startswith("p.jsonl:line 3: ") and f"field '{field}" in line and what in line and "\n" not in line


@pytest.fixture(scope="module")
def rules31(llama3_tokenizer):
    return make_rules(llama3_tokenizer, "llama3.1", True, template_text("llama3.1"))


ROWS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Well, there are many colours, and one could say blue."},
    {"prompt": [S("Answer in one word."), U("Capital of France?")], "chosen": [A("Paris")], "rejected": [A("It is Paris, a city.")]},
    {"chosen": [U("hi"), A("hello"), U("2+2?"), A("4")], "rejected": [U("hi"), A("hello"), U("2+2?"), A("Four, I think")]},
]


def test_llama31_pair_ids_match_meta_chat_format(llama3_tokenizer, rules31):
    pytest.importorskip("llama_models")
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from llama_models.datatypes import RawMessage, StopReason, ToolPromptFormat

    from llamaft.assets import llama3_tokenizer_file

    meta = ChatFormat(Tokenizer(Path(llama3_tokenizer_file())))
    date = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # the 3.1 template's system header

    def to_meta(messages, version):
        system = "".join(m["content"] for m in messages if m["role"] == "system")
        return [RawMessage(role="system", content=date + system)] + [
            RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
            for m in messages if m["role"] != "system"]

    def fmt_json():
        return ToolPromptFormat.json
    for row in ROWS:
        p = pair(row)
        ex = encode_pair(p, llama3_tokenizer, rules31)
        # The prompt: Meta's dialog prompt (ends with the assistant header) = our generation prompt for inference.
        assert ex.prompt_ids == meta.encode_dialog_prompt(to_meta(p.prompt, "3.1")).tokens
        assert ex.prompt_ids == prompt_ids(p.prompt, llama3_tokenizer, rules31)
        for answer, ids in ((p.chosen, ex.chosen_ids), (p.rejected, ex.rejected_ids)):
            raw = to_meta([answer], "3.1")[-1]
            toks, _ = meta.encode_message(raw, fmt_json())
            assert ids == toks[len(meta._encode_header("assistant")):]  # content + <|eot_id|>
            assert ids[-1] == 128009
        side = ex.side("rejected")
        assert side.input_ids == ex.prompt_ids + ex.rejected_ids
        assert side.labels == [IGNORE_INDEX] * len(ex.prompt_ids) + ex.rejected_ids


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
        pq.write_table(pa.Table.from_pylist(cells), path)
    else:
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k, "") for k in ("prompt", "chosen", "rejected")})
    return str(path)


def _cfg(train, **data):
    return config_from_dict({"model": {"name": "x"}, "data": {"train": train, "val_ratio": 0, **data},
                             "train": {"objective": "dpo"}})


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_files_in_every_format_encode_alike(tmp_path, ext, llama3_tokenizer, rules31):
    path = _write(tmp_path / f"pairs{ext}", ROWS)
    cfg = _cfg([path])
    pairs, fmt = read_file(path, cfg.data)
    assert fmt == "preference" and len(pairs) == 3 and pairs[0].where.endswith(":line 1" if ext == ".jsonl" else ":row 1")
    ds = build_datasets(cfg.data, llama3_tokenizer, rules31)
    expected = [encode_pair(pair(r), llama3_tokenizer, rules31) for r in ROWS]
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ds.train] == \
           [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in expected]
    assert ds.stats["train"]["trained_tokens"] == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in expected)


def test_a_bad_row_in_a_file_names_its_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ROWS[:2] + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:line 3: field 'rejected': identical"):
        split_conversations(_cfg([path]).data)


def test_length_policy_drops_or_cuts_pairs(tmp_path, llama3_tokenizer, rules31):
    path = _write(tmp_path / "p.jsonl", ROWS[:1])
    full = encode_pair(pair(ROWS[0]), llama3_tokenizer, rules31)
    limit = len(full.prompt_ids) + len(full.chosen_ids)  # the rejected answer is longer
    cfg = _cfg([path], max_seq_length=limit)
    with pytest.raises(DataError, match="longer than max_seq_length"):
        build_datasets(cfg.data, llama3_tokenizer, rules31)
    cfg = _cfg([path], max_seq_length=limit, truncation="truncate")
    ds = build_datasets(cfg.data, llama3_tokenizer, rules31)
    (ex,) = ds.train
    assert ex.chosen_ids == full.chosen_ids and ex.rejected_ids == full.rejected_ids[:len(full.chosen_ids)]
    assert ds.stats["train"]["truncated"] == 1


def test_objective_and_row_kinds_must_agree():
    check_objective_formats("dpo", {"a.jsonl": "preference"})
    with pytest.raises(DataError, match="a.jsonl: train.objective=dpo needs preference rows"):
        check_objective_formats("dpo", {"a.jsonl": "qa"})
    with pytest.raises(DataError, match="set train.objective=dpo, orpo or simpo"):
        check_objective_formats("sft", {"a.jsonl": "preference"})


def test_llamaft_data_shows_both_sides_and_dumps_them(tmp_path, llama3_tokenizer, rules31):
    from rich.console import Console

    path = _write(tmp_path / "p.jsonl", ROWS)
    cfg = _cfg([path])
    console = Console(record=True, width=200)
    dump = tmp_path / "dump.jsonl"
    inspect_data(cfg, lambda m, d: (llama3_tokenizer, rules31), show=1, dump=str(dump), console=console)
    text = console.export_text()
    assert "line 1 — chosen — " in text and "line 1 — rejected — " in text and "Blue.<|eot_id|>" in text
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    for row, src in zip(rows, ROWS):
        ex = encode_pair(pair(src), llama3_tokenizer, rules31)
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)
        assert row["chosen"]["input_ids"] == ex.prompt_ids + ex.chosen_ids
        assert row["rejected"]["labels"] == [IGNORE_INDEX] * len(ex.prompt_ids) + ex.rejected_ids
