"""Batches: a seeded, resumable order of global batches, and collation with dynamic padding."""
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

IGNORE_INDEX = -100
Sample = Dict[str, Any]


@dataclass
class GlobalBatch:
    """One optimizer step's samples. `num_target_tokens` normalises the loss, so a step's loss is
    the mean over the whole global batch however the layout splits it."""

    samples: List[Sample]

    @property
    def num_target_tokens(self) -> int:
        return sum(len(s["labels"]) for s in self.samples)


def collate(samples: Sequence[Sample], pad_id: int, source_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Pad to the longest sample (or to `source_length`, for static shapes) and build the decoder
    inputs: the targets shifted right behind the pad token, T5's decoder start."""
    n = len(samples)
    width = source_length or max(len(s["input_ids"]) for s in samples)
    depth = max(len(s["labels"]) for s in samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, depth), IGNORE_INDEX, dtype=torch.long)
    decoder_input_ids = torch.full((n, depth), pad_id, dtype=torch.long)
    for row, sample in enumerate(samples):
        source, target = sample["input_ids"][:width], sample["labels"]
        input_ids[row, :len(source)] = torch.tensor(source)
        attention_mask[row, :len(source)] = 1
        labels[row, :len(target)] = torch.tensor(target)
        decoder_input_ids[row, 1:len(target)] = torch.tensor(target[:-1])
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids, "labels": labels}


class BatchOrder:
    """Which examples make each global batch: a fresh seeded permutation every epoch, the last
    incomplete batch dropped so every step sees the configured global batch.

    Its state (epoch, position) is all a resumed run needs to continue the same order.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            from ..errors import UserError

            raise UserError("the training split has {} examples, fewer than one global batch of {}: "
                            "lower training.global_batch_size or give more data.".format(
                                num_examples, global_batch_size))
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def _permutation(self) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            order = self._permutation()
            while self.position < self.batches_per_epoch:
                start = self.position * self.global_batch_size
                self.position += 1
                yield order[start:start + self.global_batch_size]
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
