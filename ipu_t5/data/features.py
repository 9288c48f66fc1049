"""Examples to model features: prompt and target token ids, plus the metric's reference.

Tokenized splits are cached as Arrow files keyed by the data, the task, the tokenizer and the
length cap, so a second run (or every rank of a distributed one) reads them instead of
tokenizing again; training reads token ids from flat arrays rather than Python lists.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import datasets
import numpy as np

from ..tasks import Task
from .buckets import length_buckets

# T5 was pre-trained on 512-token inputs; longer prompts are truncated there.
MODEL_MAX_SOURCE_LENGTH = 512
FEATURE_COLUMNS = ("input_ids", "labels", "reference", "prompt")
# Bump when `tokenize` changes what it writes, so old cache files are not read.
FEATURES_VERSION = 1


@dataclass(frozen=True)
class Lengths:
    """Token lengths the data needs: they size padding, the IPU's static shapes and generation."""

    source: int
    target: int
    # The padded prompt length of compiled static shapes (the IPU's), chosen from the distribution
    # of prompt lengths; None: `source`.
    static_source: Optional[int] = None


def prompt_cap(max_source_length: Optional[int]) -> int:
    """The token count prompts are truncated to (end-of-sequence token included)."""
    return max_source_length or MODEL_MAX_SOURCE_LENGTH


def _rows(batch: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides a tokenizer's ids: its vocabulary, normaliser, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        state = Hasher.hash(tokenizer)
    extra = json.dumps([tokenizer.all_special_tokens, len(tokenizer)])
    return hashlib.sha256((state + extra).encode()).hexdigest()[:16]


def features_fingerprint(dataset: datasets.Dataset, task: Task, tokenizer, max_source_length: Optional[int]) -> str:
    """The cache key of a tokenized split. `datasets` fingerprints the raw split by its content
    and the transforms that made it; an unhashable transform gives a fresh random fingerprint,
    which can only miss the cache, never hit a wrong entry."""
    key = json.dumps([dataset._fingerprint, repr(task), tokenizer_fingerprint(tokenizer),
                      prompt_cap(max_source_length), FEATURES_VERSION])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tokenize(dataset: datasets.Dataset, task: Task, tokenizer, max_source_length: Optional[int],
             num_proc: Optional[int] = None, desc: str = "tokenizing", cache_dir: Optional[Path] = None,
             overwrite_cache: bool = False) -> datasets.Dataset:
    """Add `input_ids`, `labels`, `reference` and the `prompt` text; drop the raw columns.

    With `cache_dir`, the result is written there (`num_proc` workers write one shard each) and
    the next call with the same data, task, tokenizer and cap reads it back instead.
    """
    if all(c in dataset.column_names for c in FEATURE_COLUMNS):
        return dataset
    cap = prompt_cap(max_source_length)
    cache = {}
    if cache_dir is not None:
        fingerprint = features_fingerprint(dataset, task, tokenizer, max_source_length)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = {"cache_file_name": str(Path(cache_dir) / "features-{}.arrow".format(fingerprint)),
                 "new_fingerprint": fingerprint, "load_from_cache_file": not overwrite_cache}

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        rows = _rows(batch)
        prompts = [task.source_text(r) for r in rows]
        sources = tokenizer(prompts, truncation=True, max_length=cap)
        targets = tokenizer([task.target_text(r) for r in rows])
        return {"input_ids": sources["input_ids"], "labels": targets["input_ids"],
                "reference": [task.reference(r) for r in rows], "prompt": prompts}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc,
                       **cache)


def _token_lists(split: datasets.Dataset, column: str):
    """One list column of the split's rows (after any select or shuffle) as a pyarrow ListArray."""
    return split.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()


def _list_lengths(array) -> np.ndarray:
    """The length of every list in a pyarrow ListArray."""
    import pyarrow.compute as pc

    return pc.list_value_length(array).to_numpy(zero_copy_only=False)


def _counts(split: datasets.Dataset, column: str) -> np.ndarray:
    return _list_lengths(_token_lists(split, column))


def lengths(*splits: Optional[datasets.Dataset], static_coverage: float = 1.0) -> Lengths:
    """The longest prompt and target over the given feature splits, and the one static prompt
    length (a multiple of 8) that holds the `static_coverage` quantile of the prompts."""
    present = [s for s in splits if s is not None]
    prompts = np.concatenate([_counts(s, "input_ids") for s in present]).tolist()
    return Lengths(source=max(prompts), target=max(int(_counts(s, "labels").max()) for s in present),
                   static_source=length_buckets(prompts, max_buckets=1, multiple_of=8, coverage=static_coverage)[0])


class TokenColumns:
    """The `input_ids` and `labels` of a feature split as flat int32 arrays plus offsets.

    Four bytes per token, where Python lists spend an int object and a pointer per token (most of
    a gigabyte for GLUE MNLI's training split); `sample(i)` rebuilds one example's lists on demand.
    """

    def __init__(self, features: datasets.Dataset, columns: Sequence[str] = ("input_ids", "labels")):
        self.columns = tuple(columns)
        self._values: Dict[str, np.ndarray] = {}
        self._offsets: Dict[str, np.ndarray] = {}
        for name in self.columns:
            array = _token_lists(features, name)
            counts = _list_lengths(array).astype(np.int64)
            self._values[name] = array.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
            self._offsets[name] = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return len(self._offsets[self.columns[0]]) - 1

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        """Token count of every example in `column`."""
        return np.diff(self._offsets[column])

    def sample(self, index: int) -> Dict[str, List[int]]:
        """One example's token id lists."""
        return {name: self._values[name][self._offsets[name][index]:self._offsets[name][index + 1]].tolist()
                for name in self.columns}
