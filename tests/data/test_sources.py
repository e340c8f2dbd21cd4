"""Reading data files: every file type, the `where` of each row, and every bad-input error."""

import json

import pytest

from llamaft.data.sources import Record, read_records, validation_sets
from llamaft.errors import DataError

ROWS = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_jsonl_rows_and_line_numbers_skip_blank_lines(tmp_path):
    p = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_records(p) == [Record(ROWS[0], f"{p}:line 1"), Record(ROWS[1], f"{p}:line 3")]


def test_json_array_and_data_wrapper(tmp_path):
    a = _write(tmp_path / "a.json", json.dumps(ROWS, indent=2))
    b = _write(tmp_path / "b.json", json.dumps({"data": ROWS}))
    assert read_records(a) == [Record(ROWS[0], f"{a}:row 1"), Record(ROWS[1], f"{a}:row 2")]
    assert [r.data for r in read_records(b)] == ROWS


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    p = _write(tmp_path / "relevance_val.json", "\n".join(json.dumps(r) for r in ROWS))
    assert read_records(p) == [Record(ROWS[0], f"{p}:line 1"), Record(ROWS[1], f"{p}:line 2")]


def test_csv_keeps_strings_and_counts_data_rows(tmp_path):
    p = _write(tmp_path / "d.csv", 'question,answer,n\n"multi\nline",4,007\nq2,,\n')
    assert read_records(p) == [
        Record({"question": "multi\nline", "answer": "4", "n": "007"}, f"{p}:row 1"),
        Record({"question": "q2", "answer": "", "n": ""}, f"{p}:row 2"),
    ]


def test_tsv_and_utf8_bom(tmp_path):
    p = _write(tmp_path / "d.tsv", "\ufefftext\nhello, world\n")
    assert read_records(p) == [Record({"text": "hello, world"}, f"{p}:row 1")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert read_records(p) == [Record(ROWS[0], f"{p}:row 1"), Record(ROWS[1], f"{p}:row 2")]


def test_save_to_disk_dataset_and_single_split_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    d1, d2 = tmp_path / "ds", tmp_path / "dd"
    Dataset.from_list(ROWS).save_to_disk(str(d1))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(d2))
    assert read_records(str(d1)) == [Record(ROWS[0], f"{d1}:row 1"), Record(ROWS[1], f"{d1}:row 2")]
    assert [r.data for r in read_records(str(d2))] == ROWS


def test_save_to_disk_dict_with_several_splits_asks_for_one(tmp_path):
    from datasets import Dataset, DatasetDict

    d = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(d))
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test; point at one split's directory, e\.g\. .*dd/train"):
        read_records(str(d))
    assert len(read_records(str(d / "test"))) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("e.jsonl", "", "{p}: no rows (the file is empty)"),
        ("e.jsonl", "\n  \n", "{p}: no rows (the file is empty)"),
        ("e.json", "[]", "{p}: no rows (the file is empty)"),
        ("e.csv", "question,answer\n", "{p}: no rows (the file is empty)"),
        ("bad.jsonl", '{"a": "1"}\n{"a": 2,}\n', "{p}:line 2: malformed JSON (Expecting property name enclosed in double quotes at column 9)"),
        ("bad.jsonl", '{"a": "1"}\n\n["a"]\n', "{p}:line 3: expected a JSON object per line, got an array"),
        ("bad.json", '[\n {"a": 1},\n {"a": 2\n]', "{p}:line 4: malformed JSON (Expecting ',' delimiter at column 1)"),
        ("bad.json", '[{"a": 1}, "x"]', "{p}:row 2: expected a JSON object, got a string"),
        ("bad.json", '"x"', '{p}: expected a JSON array of objects or {{"data": [...]}}, got a string'),
        ("bad.json", '{"a": 1}', "{p}: a .json file must hold a list of rows (a JSON array of objects, or "
         '{{"data": [...]}}), not a single object; wrap it in [...] or use .jsonl for one object per line'),
        ("bad.csv", "a,b\n1,2,3\n", "{p}:row 1: 3 cells but the header has 2 columns"),
        ("bad.csv", 'q,a\nx,y\n"open,z\nq2,a2\n', '{p}:line 3: a quoted cell is never closed (it runs to the end of the file); add the closing "'),
        ("bad.csv", 'q,a\nx,"y ""z""\n', '{p}:line 2: a quoted cell is never closed (it runs to the end of the file); add the closing "'),
        ("bad.csv", "a,a\n1,2\n", "{p}:line 1: the header needs unique, non-empty column names (got ['a', 'a'])"),
        ("d.txt", "hello", "{p}: unsupported file type '.txt' (expected .jsonl, .json, .csv, .tsv, .parquet, or a datasets.save_to_disk directory)"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, content, message):
    p = _write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        read_records(p)
    assert str(err.value) == message.format(p=p)


def test_not_utf8_names_the_line(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": "caf\xe9"}\n', encoding="latin-1")
    with pytest.raises(DataError) as err:
        read_records(p)
    assert str(err.value) == f"{p}:line 2: not UTF-8 text (byte 0xe9 at offset 28); re-save the file as UTF-8"


def test_missing_file_and_plain_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found$"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        read_records(str(tmp_path))


def test_corrupt_parquet(tmp_path):
    p = _write(tmp_path / "d.parquet", b"not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: cannot read Parquet file"):
        read_records(p)


# -- validation sets ---------------------------------------------------------------------------


def test_validation_sets_none_file_mapping(tmp_path):
    f = _write(tmp_path / "v.jsonl", "{}\n")
    g = _write(tmp_path / "w.csv", "a\n1\n")
    assert validation_sets(None) == {}
    assert validation_sets(f) == {"validation": f}
    assert validation_sets({"b": g, "a": f}) == {"b": g, "a": f}
    assert list(validation_sets({"b": g, "a": f})) == ["b", "a"]  # config order, not sorted


def test_validation_list_is_named_by_stem_and_same_names_are_errors(tmp_path):
    (tmp_path / "b").mkdir()
    f = _write(tmp_path / "relevance_val.jsonl", "{}\n")
    g = _write(tmp_path / "b" / "qa.csv", "a\n1\n")
    h = _write(tmp_path / "b" / "relevance_val.jsonl", "{}\n")
    assert validation_sets([g, f]) == {"qa": g, "relevance_val": f}
    with pytest.raises(DataError) as err:
        validation_sets([f, h])
    assert str(err.value) == (f"{h}: two validation sets named 'relevance_val' ({f} and {h}); rename one, "
                              "or give data.validation as a mapping name: file")
    with pytest.raises(DataError, match=r"gone\.jsonl: validation file not found \(data\.validation\)"):
        validation_sets([f, str(tmp_path / "gone.jsonl")])


def test_validation_dir_discovers_val_files_sorted(tmp_path):
    for name in ("relevance_val.jsonl", "accuracy_val.json", "train.jsonl", "notes.txt", "val.json.bak"):
        _write(tmp_path / name, "{}\n")
    assert validation_sets(str(tmp_path)) == {
        "accuracy_val": str(tmp_path / "accuracy_val.json"),
        "relevance_val": str(tmp_path / "relevance_val.jsonl"),
    }


def test_validation_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing: validation file or directory not found \(data\.validation\)"):
        validation_sets(str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"gone\.jsonl: validation file not found \(data\.validation\.extra\)"):
        validation_sets({"extra": str(tmp_path / "gone.jsonl")})
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty / "train.jsonl", "{}\n")
    with pytest.raises(DataError, match="no validation files in this directory"):
        validation_sets(str(empty))
    dup = tmp_path / "dup"
    dup.mkdir()
    _write(dup / "a_val.json", "{}\n")
    _write(dup / "a_val.jsonl", "{}\n")
    with pytest.raises(DataError, match="two validation sets named 'a_val'"):
        validation_sets(str(dup))
