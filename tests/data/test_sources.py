"""Data sources (files in every format, the generated demo), features, batching."""
import json

import pytest
import torch

from ipu_t5.data.batching import IGNORE_INDEX, BatchOrder, GlobalBatch, collate
from ipu_t5.tasks.demo.mnli import MISMATCHED_PREMISES, TRAIN_PREMISES, generate_splits
from ipu_t5.data.sources import load_splits, parse_data_files
from ipu_t5.errors import UserError
from ipu_t5.tasks import get_task

pytestmark = pytest.mark.core

ROWS = [
    {"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0},
    {"premise": "A dog runs.", "hypothesis": "The dog is fast.", "label": 1},
    {"premise": "It rains.", "hypothesis": "It is dry.", "label": 2},
]


def _write(path, rows, fmt):
    if fmt in ("jsonl",):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        keys = list(rows[0])
        lines = [sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _files_config(make_config, tmp_path, train, validation):
    config = make_config()
    config.data.source = "files"
    config.data.data_files = {"train": str(train), "validation": str(validation)}
    return config


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_every_file_format_loads(make_config, tmp_path, fmt):
    path = _write(tmp_path / ("data." + fmt), ROWS, fmt)
    train, evaluation = load_splits(_files_config(make_config, tmp_path, path, path), get_task("mnli"))
    assert len(train) == len(evaluation) == 3
    assert train["label"] == [0, 1, 2]
    assert train["premise"][1] == "A dog runs."


def test_label_names_any_case(make_config, tmp_path):
    rows = [dict(r, label=name) for r, name in zip(ROWS, ["entailment", "Neutral", "CONTRADICTION"])]
    path = _write(tmp_path / "named.jsonl", rows, "jsonl")
    train, _ = load_splits(_files_config(make_config, tmp_path, path, path), get_task("mnli"))
    assert train["label"] == [0, 1, 2]


def _error_for(make_config, tmp_path, path):
    with pytest.raises(UserError) as info:
        load_splits(_files_config(make_config, tmp_path, path, path), get_task("mnli"))
    return str(info.value)


def _load_error(make_config, tmp_path, rows):
    return _error_for(make_config, tmp_path, _write(tmp_path / "bad.jsonl", rows, "jsonl"))


def _text_error(make_config, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return _error_for(make_config, tmp_path, tmp_path / name)


def test_missing_columns_named(make_config, tmp_path):
    rows = [{"sentence1": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"]} for r in ROWS]
    message = _load_error(make_config, tmp_path, rows)
    assert "no column 'premise'" in message and "sentence1" in message


def test_label_outside_known_set(make_config, tmp_path):
    message = _load_error(make_config, tmp_path, ROWS + [dict(ROWS[0], label=7)])
    assert "label 7" in message and "row 3" in message and "entailment/neutral/contradiction" in message


def test_unknown_label_name(make_config, tmp_path):
    assert "'maybe'" in _load_error(make_config, tmp_path, [dict(ROWS[0], label="maybe")])


def test_empty_text_field(make_config, tmp_path):
    assert "empty 'hypothesis' field" in _load_error(make_config, tmp_path, [dict(ROWS[0], hypothesis=" ")])


def test_empty_file(make_config, tmp_path):
    assert "is empty" in _text_error(make_config, tmp_path, "empty.jsonl", "")


def test_missing_file(make_config, tmp_path):
    assert "does not exist" in _error_for(make_config, tmp_path, tmp_path / "missing.jsonl")


def test_unsupported_file_type(make_config, tmp_path):
    assert "type '.txt'" in _text_error(make_config, tmp_path, "data.txt", "hello")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_bytes_that_are_not_utf8_are_named_by_line_and_offset(make_config, tmp_path, fmt):
    path = _write(tmp_path / ("data." + fmt), ROWS, fmt)
    data = path.read_bytes().replace(b"A dog runs.", b"A dog \xff\xfe runs.")
    path.write_bytes(data)
    at = data.index(b"\xff")
    message = _error_for(make_config, tmp_path, path)
    assert "data file '{}' (split train) is not UTF-8 text".format(path) in message
    assert "line {} (byte offset {}) holds 0xff".format(data[:at].count(b"\n") + 1, at) in message
    assert "iconv -f <its encoding> -t UTF-8" in message and "\n" not in message


def test_utf8_check_reads_in_chunks_cut_at_line_ends(tmp_path, monkeypatch):
    """Chunks far smaller than a line: multi-byte characters across a read boundary are fine, and
    the first bad byte is still placed exactly."""
    from ipu_t5.data import sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 5)
    good = "".join(json.dumps({"premise": "Il dort à Noël {} ✓".format(i)}, ensure_ascii=False) + "\n"
                   for i in range(9)).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good)
    sources.check_utf8(path, "d.jsonl", "train")
    bad = good + "Noël".encode("latin-1") + b"\n"
    path.write_bytes(bad)
    with pytest.raises(UserError, match=r"line 10 \(byte offset {}\) holds 0xeb,".format(len(good) + 2)):
        sources.check_utf8(path, "d.jsonl", "train")


def test_a_utf16_file_is_named_as_such(make_config, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in ROWS).encode("utf-16"))
    message = _error_for(make_config, tmp_path, path)
    assert "(it starts like UTF-16): line 1 (byte offset 0)" in message and "iconv -f UTF-16 -t UTF-8" in message


def test_a_ragged_csv_names_the_readers_reason(make_config, tmp_path):
    message = _text_error(make_config, tmp_path, "ragged.csv", "premise,hypothesis,label\nA,B,0\nA,B,1,5,6\n")
    assert "could not read data file" in message and "Expected 3 fields in line 3, saw 5" in message


def test_missing_eval_split_names_the_fix(make_config, tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS, "jsonl")
    config = make_config()
    config.data.source = "files"
    config.data.data_files = {"train": str(path)}
    with pytest.raises(UserError, match="no 'validation_mismatched' split"):
        load_splits(config, get_task("mnli"))


def test_parse_data_files():
    assert parse_data_files("train=a.jsonl, validation=b.csv") == {"train": "a.jsonl", "validation": "b.csv"}
    with pytest.raises(UserError, match="split=PATH"):
        parse_data_files("a.jsonl")


def test_demo_is_deterministic_balanced_and_mismatched():
    first, again = generate_splits(7, 300, 90), generate_splits(7, 300, 90)
    assert first == again
    assert first != generate_splits(8, 300, 90)
    labels = [r["label"] for r in first["train"]]
    assert all(labels.count(c) > 60 for c in range(3))
    # Mismatched premises come from templates that training never uses.
    slots = {"S": "S", "Vp": "V", "Vb": "v", "Vpp": "P", "O": "O", "place": "L", "time": "T",
             "extra": "E", "opener": "X", "closer": "Y"}
    train_shapes = {t(slots) for t, _ in TRAIN_PREMISES}
    assert not train_shapes & {t(slots) for t, _ in MISMATCHED_PREMISES}


def test_collate_pads_and_shifts():
    samples = [{"input_ids": [5, 6, 1], "labels": [9, 1]}, {"input_ids": [7, 1], "labels": [8, 4, 1]}]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [7, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[9, 1, IGNORE_INDEX], [8, 4, 1]]
    # The decoder starts from the pad token and sees the target shifted right.
    assert batch["decoder_input_ids"].tolist() == [[0, 9, 0], [0, 8, 4]]
    assert collate(samples, pad_id=0, source_length=5)["input_ids"].shape == torch.Size([2, 5])
    assert GlobalBatch(samples).num_target_tokens == 5


def test_batch_order_epochs_and_resume():
    order = BatchOrder(10, 3, seed=1)
    it = iter(order)
    first_epoch = [next(it) for _ in range(3)]
    assert len({i for b in first_epoch for i in b}) == 9  # one epoch, last partial batch dropped
    state = order.state_dict()
    following = [next(it) for _ in range(4)]
    resumed = BatchOrder(10, 3, seed=1)
    resumed.load_state_dict(state)
    assert [b for _, b in zip(range(4), iter(resumed))] == following


def test_batch_order_refuses_data_smaller_than_a_batch():
    with pytest.raises(UserError, match="fewer than one global batch"):
        BatchOrder(5, 8, seed=0)
