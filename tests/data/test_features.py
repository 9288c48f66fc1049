"""Tokenized features: the cache a second run reuses, worker processes, compact token columns."""
import os

import datasets
import pytest

from ipu_t5.tasks.demo.mnli import generate_splits
from ipu_t5.data.features import TokenColumns, lengths, tokenize
from ipu_t5.tasks import get_task
from ipu_t5.tokenizer import demo_tokenizer

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def raw():
    return datasets.Dataset.from_list(generate_splits(0, 300, 10)["train"])


@pytest.fixture(scope="module")
def tokenizer(raw):
    task = get_task("mnli")
    rows = raw.to_list()
    return demo_tokenizer([task.source_text(r) for r in rows] + [task.target_text(r) for r in rows], 512)


class CountingTokenizer:
    """Delegates to a real tokenizer and counts how often it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _files(features):
    return sorted(f["filename"] for f in features.cache_files)


def test_second_tokenization_reads_the_cache(raw, tokenizer, tmp_path):
    task = get_task("mnli")
    first = tokenize(raw, task, tokenizer, None, cache_dir=tmp_path)
    cached = _files(first)
    assert len(cached) == 1 and cached[0].startswith(str(tmp_path))
    written = os.stat(cached[0]).st_mtime_ns
    counting = CountingTokenizer(tokenizer)
    again = tokenize(raw, task, counting, None, cache_dir=tmp_path)
    assert counting.calls == 0  # nothing was tokenized: the file was read back
    assert _files(again) == cached and os.stat(cached[0]).st_mtime_ns == written
    assert again["input_ids"][:5] == first["input_ids"][:5]
    # Anything that changes the ids is a different entry: a length cap, other data.
    capped = tokenize(raw, task, counting, 12, cache_dir=tmp_path)
    assert counting.calls > 0 and _files(capped) != cached
    assert lengths(capped).source == 12
    other = tokenize(raw.select(range(100)), task, tokenizer, None, cache_dir=tmp_path)
    assert _files(other) != cached and len(other) == 100
    # overwrite_cache tokenizes again.
    counting.calls = 0
    tokenize(raw, task, counting, None, cache_dir=tmp_path, overwrite_cache=True)
    assert counting.calls > 0


def test_worker_processes_write_and_reuse_shards(raw, tokenizer, tmp_path):
    task = get_task("mnli")
    single = tokenize(raw, task, tokenizer, None)
    parallel = tokenize(raw, task, tokenizer, None, num_proc=2, cache_dir=tmp_path)
    assert len(_files(parallel)) == 2
    assert parallel["input_ids"][:] == single["input_ids"][:]
    counting = CountingTokenizer(tokenizer)
    again = tokenize(raw, task, counting, None, num_proc=2, cache_dir=tmp_path)
    assert counting.calls == 0 and _files(again) == _files(parallel)


def test_token_columns_match_the_lists(raw, tokenizer):
    features = tokenize(raw, get_task("mnli"), tokenizer, None).select([5, 2, 9])
    columns = TokenColumns(features)
    assert len(columns) == 3
    assert [columns.sample(i) for i in range(3)] == [
        {"input_ids": r["input_ids"], "labels": r["labels"]} for r in features.to_list()]
    assert columns.lengths().tolist() == [len(ids) for ids in features["input_ids"]]


def test_trainer_reuses_tokenized_data_between_runs(make_config, tmp_path):
    from ipu_t5.training.trainer import T5Trainer

    first = T5Trainer(make_config(tmp_path / "a", **{"data.demo_train_samples": 200, "data.demo_eval_samples": 20}))
    second = T5Trainer(make_config(tmp_path / "b", **{"data.demo_train_samples": 200, "data.demo_eval_samples": 20}))
    assert _files(second.train_features) == _files(first.train_features)
    assert _files(second.eval_features) == _files(first.eval_features)
    assert "features" in _files(first.train_features)[0]
