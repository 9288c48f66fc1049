"""How long validation (greedy generation) should take on IPUs, and what its executors hold:
per-IPU arithmetic on the split phases, no torch.

Under phased execution generation runs with a key/value cache (`kv_generation.py`): per batch the
encoder executor (embedding and encoder phases over the prompts) runs once per encoder chunk, then
the decoder-step executor (embedding, decoder and LM head phases for one position, the
cross-attention's keys and values recomputed from the encoder output) runs once per generated token
over the whole batch. Every call streams its phases' weights in once (inference keeps no gradients
or optimizer state) and runs the forward pass only, so a decoder step costs nearly the same
whatever its batch: at XXL on a Pod16 its 0.8 GB of weights per IPU take longer to stream than its
20 prompts take to compute. The encoder's working set grows with the prompts' length and the
step's with one position, so the step takes a batch several encoder chunks wide and streams its
weights once for all of them. The encoder output goes to the host after the encoder and back in
with every step, over the host link (counted at the Streaming Memory rate); while a step runs it
is held whole on one IPU, beside the self-attention caches. For comparison, the whole-model path
runs every phase over the prompts and all target positions once per generated token, as
Graphcore's Flan-T5 validation does.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ...models import ModelSize
from .cost import BASE_RATES, Rates, exchanged_bytes, phase_flops, term_seconds
from .memory import RESERVED_BYTES, SRAM_BYTES, Shapes, SplitPhase, split_activations

# MNLI's validation_mismatched, the prompts Graphcore's validation took about 18 minutes for
# (inference config `xxl-mnli`: micro-batch 20, 268-token prompts, 5 new tokens, whole model per token).
VALIDATION_PROMPTS = 9832
GRAPHCORE_VALIDATION_SECONDS = 18 * 60
# The largest evaluation batch the plan weighs.
MAX_EVAL_BATCH = 512


@dataclass(frozen=True)
class GenerationCost:
    """Validation of `prompts` prompts: seconds with the cache and without, and the fullest IPU."""

    prompts: int
    batch: int
    calls: int
    seconds: float
    whole_model_seconds: float
    peak_bytes: int
    # The largest batch (a multiple of the replicas, up to MAX_EVAL_BATCH) whose executors fit
    # with headroom, and its seconds with the cache: what to set validation.per_device_eval_batch_size to.
    best_batch: int = 0
    best_seconds: float = 0.0
    # Prompts per encoder call: the batch runs through the encoder in chunks of this many.
    encoder_batch: int = 0
    best_encoder_batch: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= SRAM_BYTES


def _phase_shapes(phase: SplitPhase, shapes: Shapes, step: bool) -> Shapes:
    """A decoder step's embedding looks up one token per prompt, not the prompt."""
    if step and phase.kind == "embedding":
        return Shapes(shapes.micro_batch_size, 1, 1, shapes.activation_bytes)
    return shapes


def _call_seconds(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, shards: int,
                  rates: Rates, step: bool = False, host_bytes: float = 0.0) -> float:
    """One inference call through `phases`: weights in once, the forward pass, its exchange, and
    `host_bytes` to or from the host."""
    flops, streamed, exchanged = 0.0, float(host_bytes), 0.0
    for phase in phases:
        mine = _phase_shapes(phase, shapes, step)
        flops += mine.micro_batch_size * phase_flops(size, phase, mine.source_length, mine.target_length) / parts
        streamed += mine.activation_bytes * phase.share / shards
        exchanged += exchanged_bytes(size, phase, mine, parts) / 2  # the forward half
        if shards > 1:
            exchanged += mine.activation_bytes * phase.share * (shards - 1) / shards
    return sum(term_seconds(flops, streamed, exchanged, rates))


def _peak(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, slices: int,
          matmul_proportion: float, step: bool = False, resident: int = 0) -> int:
    """The fullest IPU of an inference call: a phase's weights and its forward working set, and
    `resident` bytes held through the whole call."""
    working = int(matmul_proportion * SRAM_BYTES) + RESERVED_BYTES + resident
    rows = []
    for phase in phases:
        mine = _phase_shapes(phase, shapes, step)
        activations, partials = split_activations(size, phase, mine, parts, slices, True)
        rows.append(mine.activation_bytes * phase.share + activations + partials + working)
    return max(rows)


def encoder_output_bytes(size: ModelSize, micro: int, source: int, weight_bytes: int) -> int:
    """One replica's encoder output: to the host after the encoder, back in with every step."""
    return micro * source * size.d_model * weight_bytes


def step_resident(size: ModelSize, micro: int, source: int, positions: int, parts: int, weight_bytes: int) -> int:
    """What a decoder step holds on its fullest IPU for the whole call: the encoder output (an
    input, counted whole on one IPU) and that IPU's heads' self-attention caches of every layer."""
    heads = -(-size.num_heads // parts)
    caches = size.num_decoder_layers * 2 * micro * heads * positions * size.d_kv * weight_bytes
    return encoder_output_bytes(size, micro, source, weight_bytes) + caches


def split_by_executor(phases: Sequence[SplitPhase]) -> Tuple[List[SplitPhase], List[SplitPhase]]:
    """(the encoder executor's phases, the decoder step's), as kv_generation places them."""
    encoder = [p for p in phases if p.kind == "embedding" or p.stack == "encoder"]
    decoder = [p for p in phases if p.kind == "embedding" or p.stack == "decoder"]
    return encoder, decoder


def kv_batch(eval_batch: int, replicas: int) -> int:
    """Samples per generation call: the evaluation batch rounded up to whole replicas."""
    return int(math.ceil(eval_batch / replicas)) * replicas


def encoder_chunk(batch: int, largest: int, replicas: int) -> int:
    """Prompts per encoder call for a batch of `batch`: as few near-equal chunks as keep each at
    most `largest` (a multiple of `replicas`), each rounded up to whole replicas."""
    chunks = int(math.ceil(batch / max(largest, replicas)))
    return kv_batch(int(math.ceil(batch / chunks)), replicas)


def generation_cost(size: ModelSize, phases: Sequence[SplitPhase], parts: int, slices: int, batch: int,
                    replicas: int, shards: int, source: int, new_tokens: int, weight_bytes: int,
                    matmul_proportion: float, prompts: int = VALIDATION_PROMPTS,
                    rates: Rates = BASE_RATES, encoder_batch: int = 0) -> GenerationCost:
    """Validation of `prompts` prompts, `batch` per decoder step (over `replicas`) and
    `encoder_batch` (default `batch`) per encoder call, `new_tokens` each."""
    encoder_batch = encoder_batch or batch
    micro, encoder_micro = batch // replicas, encoder_batch // replicas
    encoder, decoder = split_by_executor(phases)
    calls = int(math.ceil(prompts / batch))
    chunks = int(math.ceil(batch / encoder_batch))
    encoding = Shapes(encoder_micro, source, 1, weight_bytes)
    stepping = Shapes(micro, source, 1, weight_bytes)
    per_batch = (chunks * _call_seconds(size, encoder, encoding, parts, shards, rates,
                                        host_bytes=encoder_output_bytes(size, encoder_micro, source, weight_bytes))
                 + new_tokens * _call_seconds(size, decoder, stepping, parts, shards, rates, step=True,
                                              host_bytes=encoder_output_bytes(size, micro, source, weight_bytes)))
    whole = new_tokens * _call_seconds(size, phases, Shapes(micro, source, new_tokens, weight_bytes), parts, shards,
                                       rates)
    resident = step_resident(size, micro, source, new_tokens, parts, weight_bytes)
    peak = max(_peak(size, encoder, encoding, parts, slices, matmul_proportion),
               _peak(size, decoder, stepping, parts, slices, matmul_proportion, step=True, resident=resident))
    return GenerationCost(prompts, batch, calls, calls * per_batch, calls * whole, peak, encoder_batch=encoder_batch)


def largest_encoder_batch(size: ModelSize, phases: Sequence[SplitPhase], parts: int, slices: int, replicas: int,
                          source: int, weight_bytes: int, matmul_proportion: float, limit: float,
                          most: int = MAX_EVAL_BATCH) -> int:
    """The largest encoder call (a multiple of `replicas`, at most `most`) within `limit` bytes;
    `replicas` when none is."""
    encoder, _ = split_by_executor(phases)
    best = replicas
    for candidate in range(replicas, most + 1, replicas):
        shapes = Shapes(candidate // replicas, source, 1, weight_bytes)
        if _peak(size, encoder, shapes, parts, slices, matmul_proportion) > limit:
            break
        best = candidate
    return best


def best_generation(size: ModelSize, phases: Sequence[SplitPhase], parts: int, slices: int, batch: int,
                    replicas: int, shards: int, source: int, new_tokens: int, weight_bytes: int,
                    matmul_proportion: float, headroom: float, prompts: int = VALIDATION_PROMPTS,
                    rates: Rates = BASE_RATES) -> GenerationCost:
    """`generation_cost` at `batch`, its encoder in chunks that fit `headroom` of the SRAM, with
    the fastest batch whose executors fit."""
    limit = headroom * SRAM_BYTES
    args = (size, phases, parts, slices)
    rest = (replicas, shards, source, new_tokens, weight_bytes, matmul_proportion, prompts, rates)
    largest = largest_encoder_batch(size, phases, parts, slices, replicas, source, weight_bytes, matmul_proportion,
                                    limit)
    configured = generation_cost(*args, batch, *rest, encoder_batch=encoder_chunk(batch, largest, replicas))
    best = None
    for candidate in range(replicas, MAX_EVAL_BATCH + 1, replicas):
        cost = generation_cost(*args, candidate, *rest, encoder_batch=encoder_chunk(candidate, largest, replicas))
        if cost.peak_bytes > limit:
            break  # the step's working set only grows with the batch
        if best is None or cost.seconds < best.seconds:
            best = cost
    if best is None:
        return configured
    return GenerationCost(configured.prompts, configured.batch, configured.calls, configured.seconds,
                          configured.whole_model_seconds, configured.peak_bytes, best.batch, best.seconds,
                          configured.encoder_batch, best.encoder_batch)
