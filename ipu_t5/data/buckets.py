"""Static shapes from the data's length distribution.

A compiled graph (poptorch on the IPU, or torch.compile with static shapes) runs one input shape
per executable. Padding every prompt to the longest in the data wastes most of the compute on
MNLI, whose prompts are mostly far shorter than its longest; a few padded lengths ("buckets"),
chosen from the tokenized lengths, keep the waste small with a handful of executables. Batches
then pad to the bucket of their longest prompt (`bucket_length`); with length-grouped batches
that is close to each prompt's own bucket, which is what `length_buckets` optimises for.
"""
import math
from typing import List, Sequence


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / float(multiple))) * multiple


def length_buckets(lengths: Sequence[int], max_buckets: int = 4, multiple_of: int = 8, coverage: float = 1.0) -> List[int]:
    """Padded source lengths, ascending, for static shapes.

    Chooses at most `max_buckets` boundaries (multiples of `multiple_of`) that minimise the total
    padded tokens when every prompt is padded to the smallest boundary that holds it. The largest
    boundary holds the `coverage` quantile of the lengths (1.0: every prompt; 0.99 truncates the
    longest 1% to it). `max_buckets=1` gives the single padded length of a one-shape graph.
    """
    if not lengths:
        raise ValueError("no lengths to choose buckets from")
    if max_buckets < 1 or multiple_of < 1 or not 0.0 < coverage <= 1.0:
        raise ValueError("need max_buckets >= 1, multiple_of >= 1 and 0 < coverage <= 1")
    ordered = sorted(lengths)
    cap = _round_up(ordered[max(0, int(math.ceil(coverage * len(ordered))) - 1)], multiple_of)
    counts = {}
    for length in ordered:
        key = min(_round_up(max(length, 1), multiple_of), cap)
        counts[key] = counts.get(key, 0) + 1
    sizes = sorted(counts)
    # best[k][j]: least padded tokens covering sizes[:j + 1] with k + 1 buckets, the last at sizes[j].
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + counts[size])
    inf = float("inf")
    best = [[inf] * len(sizes) for _ in range(max_buckets)]
    choice = [[-1] * len(sizes) for _ in range(max_buckets)]
    for j, size in enumerate(sizes):
        best[0][j] = prefix[j + 1] * size
    for k in range(1, max_buckets):
        for j, size in enumerate(sizes):
            for i in range(j):
                cost = best[k - 1][i] + (prefix[j + 1] - prefix[i + 1]) * size
                if cost < best[k][j]:
                    best[k][j], choice[k][j] = cost, i
    last = len(sizes) - 1
    k = min(range(max_buckets), key=lambda n: (best[n][last], n))
    boundaries = []
    j = last
    while k >= 0 and j >= 0:
        boundaries.append(sizes[j])
        j = choice[k][j]
        k -= 1
    return sorted(boundaries)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`; the largest (truncating) when none does."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return buckets[-1]


def padded_tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Source positions computed when each batch pads to its longest prompt (dynamic padding)."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
