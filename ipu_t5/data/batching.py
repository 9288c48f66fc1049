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


# Length grouping sorts within windows of this many global batches, as Hugging Face's
# LengthGroupedSampler does: wide enough that each batch holds similar lengths, narrow enough
# that every part of a large epoch still mixes short and long examples.
MEGABATCH_BATCHES = 50


def group_by_length(indices: Sequence[int], lengths: Sequence[int], batch_size: int, windows: int,
                    generator: torch.Generator) -> List[List[int]]:
    """Cut `indices` (already shuffled) into batches of similar lengths.

    Each window of `windows` batches is sorted by length, longest first, and cut into batches;
    the batches are then shuffled, so length does not trend within the epoch, and the batch
    holding the longest example goes first, so a batch that does not fit in memory fails at once.
    """
    size = windows * batch_size
    batches: List[List[int]] = []
    for start in range(0, len(indices), size):
        window = sorted(indices[start:start + size], key=lambda i: (-lengths[i], i))
        batches.extend(window[b:b + batch_size] for b in range(0, len(window), batch_size))
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class BatchOrder:
    """Which examples make each global batch: a fresh seeded permutation every epoch, the last
    incomplete batch dropped so every step sees the configured global batch.

    Given `lengths` (prompt token counts per example), batches hold examples of similar length
    (`group_by_length`), so dynamic padding wastes little compute.

    Each epoch's batches are a pure function of the seed, the epoch and the lengths, so its state
    (epoch, position) is all a resumed run needs to continue the same order.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int,
                 lengths: Optional[Sequence[int]] = None):
        if num_examples < global_batch_size:
            from ..errors import UserError

            raise UserError("the training split has {} examples, fewer than one global batch of {}: "
                            "lower training.global_batch_size or give more data.".format(
                                num_examples, global_batch_size))
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError("{} lengths for {} examples".format(len(lengths), num_examples))
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.lengths = lengths
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def grouped(self) -> bool:
        return self.lengths is not None

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The global batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        kept = torch.randperm(self.num_examples, generator=generator).tolist()[:self.batches_per_epoch * self.global_batch_size]
        if self.lengths is None:
            return [kept[start:start + self.global_batch_size] for start in range(0, len(kept), self.global_batch_size)]
        return group_by_length(kept, self.lengths, self.global_batch_size, MEGABATCH_BATCHES, generator)

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < self.batches_per_epoch:
                self.position += 1
                yield batches[self.position - 1]
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch_size": self.global_batch_size,
                "group_by_length": self.grouped}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
