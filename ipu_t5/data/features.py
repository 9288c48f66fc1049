"""Examples to model features: prompt and target token ids, plus the metric's reference."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import datasets

from ..tasks import Task

# T5 was pre-trained on 512-token inputs; longer prompts are truncated there.
MODEL_MAX_SOURCE_LENGTH = 512
FEATURE_COLUMNS = ("input_ids", "labels", "reference", "prompt")


@dataclass(frozen=True)
class Lengths:
    """Token lengths the data needs: they size padding, the IPU's static shapes and generation."""

    source: int
    target: int


def _rows(batch: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def tokenize(dataset: datasets.Dataset, task: Task, tokenizer, max_source_length: Optional[int],
             num_proc: Optional[int] = None, desc: str = "tokenizing") -> datasets.Dataset:
    """Add `input_ids`, `labels`, `reference` and the `prompt` text; drop the raw columns."""
    if all(c in dataset.column_names for c in FEATURE_COLUMNS):
        return dataset
    cap = max_source_length or MODEL_MAX_SOURCE_LENGTH

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        rows = _rows(batch)
        prompts = [task.source_text(r) for r in rows]
        sources = tokenizer(prompts, truncation=True, max_length=cap)
        targets = tokenizer([task.target_text(r) for r in rows])
        return {"input_ids": sources["input_ids"], "labels": targets["input_ids"],
                "reference": [task.reference(r) for r in rows], "prompt": prompts}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc)


def lengths(*splits: Optional[datasets.Dataset]) -> Lengths:
    """The longest prompt and target over the given feature splits."""
    present = [s for s in splits if s is not None]
    return Lengths(
        source=max(max(len(ids) for ids in s["input_ids"]) for s in present),
        target=max(max(len(ids) for ids in s["labels"]) for s in present),
    )
