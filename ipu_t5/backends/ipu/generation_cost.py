"""How long validation (greedy generation) should take on IPUs, and what its executors hold:
per-IPU arithmetic on the split phases, no torch.

Under phased execution generation runs with a key/value cache (`kv_generation.py`): per batch one
call of the encoder executor (embedding and encoder phases over the prompts), then one call of the
decoder-step executor per generated token (embedding, decoder and LM head phases for one position,
the cross-attention's keys and values recomputed from the encoder output). Every call streams its
phases' weights in once (inference keeps no gradients or optimizer state) and runs the forward
pass only. For comparison, the whole-model path runs every phase over the prompts and all target
positions once per generated token, as Graphcore's Flan-T5 validation does.
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


@dataclass(frozen=True)
class GenerationCost:
    """Validation of `prompts` prompts: seconds with the cache and without, and the fullest IPU."""

    prompts: int
    batch: int
    calls: int
    seconds: float
    whole_model_seconds: float
    peak_bytes: int
    # The largest batch (a multiple of the replicas, up to 256) whose executors fit with headroom,
    # and its seconds with the cache: what to set validation.per_device_eval_batch_size to.
    best_batch: int = 0
    best_seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= SRAM_BYTES


def _call_seconds(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, shards: int,
                  rates: Rates) -> float:
    """One inference call through `phases`: weights in once, the forward pass, its exchange."""
    flops = streamed = exchanged = 0.0
    for phase in phases:
        flops += shapes.micro_batch_size * phase_flops(size, phase, shapes.source_length, shapes.target_length) / parts
        streamed += shapes.activation_bytes * phase.share / shards
        exchanged += exchanged_bytes(size, phase, shapes, parts) / 2  # the forward half
        if shards > 1:
            exchanged += shapes.activation_bytes * phase.share * (shards - 1) / shards
    return sum(term_seconds(flops, streamed, exchanged, rates))


def _peak(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, slices: int,
          matmul_proportion: float) -> int:
    """The fullest IPU of an inference call: a phase's weights and its forward working set."""
    working = int(matmul_proportion * SRAM_BYTES) + RESERVED_BYTES
    rows = []
    for phase in phases:
        activations, partials = split_activations(size, phase, shapes, parts, slices, True)
        rows.append(shapes.activation_bytes * phase.share + activations + partials + working)
    return max(rows)


def split_by_executor(phases: Sequence[SplitPhase]) -> Tuple[List[SplitPhase], List[SplitPhase]]:
    """(the encoder executor's phases, the decoder step's), as kv_generation places them."""
    encoder = [p for p in phases if p.kind == "embedding" or p.stack == "encoder"]
    decoder = [p for p in phases if p.kind == "embedding" or p.stack == "decoder"]
    return encoder, decoder


def kv_batch(eval_batch: int, replicas: int) -> int:
    """Samples per generation call: the evaluation batch rounded up to whole replicas."""
    return int(math.ceil(eval_batch / replicas)) * replicas


def generation_cost(size: ModelSize, phases: Sequence[SplitPhase], parts: int, slices: int, batch: int,
                    replicas: int, shards: int, source: int, new_tokens: int, weight_bytes: int,
                    matmul_proportion: float, prompts: int = VALIDATION_PROMPTS,
                    rates: Rates = BASE_RATES) -> GenerationCost:
    """Validation of `prompts` prompts, `batch` per call (over `replicas`), `new_tokens` each."""
    micro = batch // replicas
    encoder, decoder = split_by_executor(phases)
    calls = int(math.ceil(prompts / batch))
    encoding = Shapes(micro, source, 1, weight_bytes)
    stepping = Shapes(micro, source, 1, weight_bytes)
    per_batch = (_call_seconds(size, encoder, encoding, parts, shards, rates)
                 + new_tokens * _call_seconds(size, decoder, stepping, parts, shards, rates))
    whole = new_tokens * _call_seconds(size, phases, Shapes(micro, source, new_tokens, weight_bytes), parts, shards,
                                       rates)
    peak = max(_peak(size, encoder, encoding, parts, slices, matmul_proportion),
               _peak(size, decoder, stepping, parts, slices, matmul_proportion))
    return GenerationCost(prompts, batch, calls, calls * per_batch, calls * whole, peak)


def best_generation(size: ModelSize, phases: Sequence[SplitPhase], parts: int, slices: int, batch: int,
                    replicas: int, shards: int, source: int, new_tokens: int, weight_bytes: int,
                    matmul_proportion: float, headroom: float, prompts: int = VALIDATION_PROMPTS,
                    rates: Rates = BASE_RATES) -> GenerationCost:
    """`generation_cost` at `batch`, with the largest batch that fits `headroom` of the SRAM."""
    args = (size, phases, parts, slices)
    rest = (replicas, shards, source, new_tokens, weight_bytes, matmul_proportion, prompts, rates)
    configured = generation_cost(*args, batch, *rest)
    best = None
    for candidate in range(replicas, 257, replicas):
        cost = generation_cost(*args, candidate, *rest)
        if cost.peak_bytes > headroom * SRAM_BYTES:
            break
        best = cost
    if best is None:
        return configured
    return GenerationCost(configured.prompts, configured.batch, configured.calls, configured.seconds,
                          configured.whole_model_seconds, configured.peak_bytes, best.batch, best.seconds)
