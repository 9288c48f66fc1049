"""Length-grouped batch order (coverage, determinism, resume, less padding) and static-shape buckets."""
import itertools
import random

import pytest

from ipu_t5.data.batching import BatchOrder
from ipu_t5.data.buckets import bucket_length, length_buckets, padded_tokens

pytestmark = pytest.mark.core


def mnli_shaped_lengths(count, seed=0):
    """Prompt lengths as bench/mnli_shaped.py makes them: a short demo clause (34 to 67 tokens)
    plus a geometric number of 15-token fillers, so most are short and a few several times longer."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        fillers = 0
        while rng.random() < 0.55:
            fillers += 1
        lengths.append(rng.randint(34, 67) + 15 * fillers)
    return lengths


def take(order, count):
    return [batch for _, batch in zip(range(count), iter(order))]


def test_grouped_epoch_covers_each_kept_example_once():
    lengths = mnli_shaped_lengths(1000)
    order = BatchOrder(1000, 32, seed=3, lengths=lengths)
    epoch = take(order, order.batches_per_epoch)
    flat = [i for batch in epoch for i in batch]
    assert all(len(batch) == 32 for batch in epoch)
    assert len(flat) == len(set(flat)) == 31 * 32  # the last 8 examples make no full batch
    # The next epoch is a different grouping of (mostly) the same examples.
    following = take(order, order.batches_per_epoch)
    assert {tuple(b) for b in following} != {tuple(b) for b in epoch}
    assert len({i for b in following for i in b}) == 31 * 32


def test_grouped_order_is_deterministic_and_seeded():
    lengths = mnli_shaped_lengths(500)
    first = take(BatchOrder(500, 16, seed=1, lengths=lengths), 40)
    assert first == take(BatchOrder(500, 16, seed=1, lengths=lengths), 40)
    assert first != take(BatchOrder(500, 16, seed=2, lengths=lengths), 40)


def test_grouped_order_resumes_exactly_across_epochs():
    lengths = mnli_shaped_lengths(300)
    order = BatchOrder(300, 16, seed=5, lengths=lengths)
    it = iter(order)
    for _ in range(15):  # 18 batches per epoch: stop inside the first
        next(it)
    state = order.state_dict()
    assert state["group_by_length"] is True and state["position"] == 15
    expected = [next(it) for _ in range(10)]  # crosses into the second epoch
    resumed = BatchOrder(300, 16, seed=5, lengths=lengths)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected


def test_grouping_cuts_padding_on_mnli_shaped_lengths():
    lengths = mnli_shaped_lengths(4000)
    plain = BatchOrder(4000, 32, seed=0)
    grouped = BatchOrder(4000, 32, seed=0, lengths=lengths)
    real = sum(lengths[i] for batch in take(plain, plain.batches_per_epoch) for i in batch)
    padded_plain = padded_tokens(take(plain, plain.batches_per_epoch), lengths)
    padded_grouped = padded_tokens(take(grouped, grouped.batches_per_epoch), lengths)
    # Random batches of 32 pad to a long straggler; grouped ones stay close to the real tokens.
    assert padded_plain > 1.5 * real
    assert padded_grouped < 1.1 * real
    # The batch holding the longest example comes first, so memory runs out at once if it will.
    first = take(BatchOrder(4000, 32, seed=0, lengths=lengths), 1)[0]
    kept = [i for batch in take(BatchOrder(4000, 32, seed=0, lengths=lengths), 125) for i in batch]
    assert max(lengths[i] for i in first) == max(lengths[i] for i in kept)


def test_ungrouped_order_is_the_plain_seeded_permutation():
    import torch

    order = BatchOrder(100, 10, seed=4)
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(4 * 100003)).tolist()
    assert [i for batch in take(order, 10) for i in batch] == expected
    assert order.state_dict()["group_by_length"] is False


def test_an_epoch_of_up_to_50_batches_is_sorted_whole_as_hugging_face_does():
    import random

    rng = random.Random(0)
    lengths = [rng.randrange(5, 200) for _ in range(1280)]
    order = BatchOrder(len(lengths), 32, seed=1, lengths=lengths)
    batches = take(order, order.batches_per_epoch)
    # One window of 40 batches: sorted as a whole, no two batches' length ranges interleave.
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))
    assert sorted(i for b in batches for i in b) == list(range(1280))


def _best_padding(lengths, max_buckets, multiple_of):
    """Brute force: the least padded tokens over every choice of boundaries."""
    top = -(-max(lengths) // multiple_of) * multiple_of
    candidates = sorted({-(-n // multiple_of) * multiple_of for n in lengths})
    best = None
    for k in range(max_buckets):
        for chosen in itertools.combinations([c for c in candidates if c < top], k):
            buckets = list(chosen) + [top]
            cost = sum(bucket_length(n, buckets) for n in lengths)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("max_buckets", [1, 2, 3, 4])
def test_length_buckets_minimise_padding(max_buckets):
    lengths = mnli_shaped_lengths(400, seed=max_buckets)
    buckets = length_buckets(lengths, max_buckets=max_buckets, multiple_of=8)
    assert buckets == sorted(set(buckets)) and len(buckets) <= max_buckets
    assert all(b % 8 == 0 for b in buckets) and buckets[-1] >= max(lengths)
    assert sum(bucket_length(n, buckets) for n in lengths) == _best_padding(lengths, max_buckets, 8)


def test_length_buckets_single_shape_and_coverage():
    lengths = mnli_shaped_lengths(1000)
    assert length_buckets(lengths, max_buckets=1) == [-(-max(lengths) // 8) * 8]
    few = length_buckets(lengths, max_buckets=3)
    one_padding = sum(bucket_length(n, length_buckets(lengths, max_buckets=1)) for n in lengths)
    assert sum(bucket_length(n, few) for n in lengths) < 0.6 * one_padding
    # Coverage below 1 truncates the longest prompts to a shorter top bucket.
    capped = length_buckets(lengths, max_buckets=3, coverage=0.95)
    assert capped[-1] < max(lengths)
    assert bucket_length(max(lengths), capped) == capped[-1]
    with pytest.raises(ValueError):
        length_buckets([], max_buckets=2)
