"""How long a training step should take on Graphcore IPUs: per-IPU arithmetic, no torch.

Three costs per IPU and step, each at a rate Graphcore publishes (docs/ipu.md cites the pages):
- compute: the matmul FLOPs of the forward pass and twice that for the backward, at
  MATMUL_EFFICIENCY of the Mk2 IPU's float16 peak (an IPU-M2000 is 1 petaFLOPS FP16.16 over 4
  IPUs: 250 TFLOPS each);
- streaming: bytes to and from Streaming Memory (weights, gradient accumulators, AdamW moments,
  and, in phased execution, the activations kept for the backward pass), at
  STREAMING_BYTES_PER_SECOND. No Graphcore datasheet we could read gives this rate, so it is an
  assumption, named as one, and deliberately low;
- exchange: bytes over IPU-Links (the partial sums and gathered inputs of split phases, pipeline
  activations, replicas' gradient reductions and sharded weights), at the IPU-Link rate the
  IPU-M2000 and Bow-2000 datasheets give (512 Gbps).
Serial phases run their three costs one after another; parallel phases stream one group's next
phase while the other group computes, so the step is the larger of the two per phase. Estimates
to choose a layout before a compile, and to check against a first run's step time, not a
promise.
"""
from dataclasses import dataclass
from typing import Sequence

from ...models import ModelSize
from .memory import OPTIMIZER_BYTES_PER_PARAM, Shapes, SplitPhase, split_saved

PEAK_FLOPS_PER_IPU = 250e12
MATMUL_EFFICIENCY = 0.5
IPU_LINK_BYTES_PER_SECOND = 512e9 / 8
# ASSUMED, not published: reads and writes together at half of one direction (32 GB/s) of the
# GC200's 64 GB/s PCIe Gen4 x16 link, through which an IPU reaches the IPU-Gateway's memory.
STREAMING_BYTES_PER_SECOND = 16e9
# Forward plus backward (gradients of inputs and of weights) per forward FLOP.
TRAINING_PASSES = 3


@dataclass(frozen=True)
class Rates:
    """The three rates a step estimate divides by, per IPU: matmul FLOPs per second, bytes per
    second to and from Streaming Memory, bytes per second over IPU-Links."""

    flops_per_second: float
    streaming_bytes_per_second: float
    link_bytes_per_second: float

    def scaled(self, compute: float = 1.0, streaming: float = 1.0, links: float = 1.0) -> "Rates":
        """These rates with each term `factor` times slower."""
        return Rates(self.flops_per_second / compute, self.streaming_bytes_per_second / streaming,
                     self.link_bytes_per_second / links)


# The rates as published or assumed above, before any calibration (calibration.py).
BASE_RATES = Rates(PEAK_FLOPS_PER_IPU * MATMUL_EFFICIENCY, STREAMING_BYTES_PER_SECOND, IPU_LINK_BYTES_PER_SECOND)


@dataclass(frozen=True)
class StepCost:
    """One training step's estimated cost on the busiest IPU, and the step it adds up to."""

    flops: float
    streamed_bytes: float
    exchanged_bytes: float
    compute_seconds: float
    streaming_seconds: float
    exchange_seconds: float
    step_seconds: float
    samples_per_second: float

    def describe(self) -> str:
        return "{} s per step (compute {} s, streaming {} s, exchange {} s), {} samples/s".format(
            seconds(self.step_seconds), seconds(self.compute_seconds), seconds(self.streaming_seconds),
            seconds(self.exchange_seconds), seconds(self.samples_per_second))


def seconds(value: float) -> str:
    """One decimal for the big sizes, three significant digits for the small ones."""
    return "{:.1f}".format(value) if value >= 10 else "{:.3g}".format(value)


def term_seconds(flops: float, streamed: float, exchanged: float, rates: Rates = BASE_RATES):
    """(compute, streaming, exchange) seconds of those amounts at `rates`."""
    return (flops / rates.flops_per_second, streamed / rates.streaming_bytes_per_second,
            exchanged / rates.link_bytes_per_second)


def phase_flops(size: ModelSize, phase: SplitPhase, source: int, target: int) -> float:
    """Forward FLOPs of a whole phase for one sample."""
    if phase.kind == "embedding":
        return 0.0
    if phase.kind == "lm_head":
        return size.block_flops("lm_head", source, target)
    block = phase.blocks[0]
    sub = phase.name.split(".")[2]
    order = ("attention", "ff") if phase.stack == "encoder" else ("self_attention", "cross_attention", "ff")
    return size.sublayer_flops(block, source, target)[order.index(sub)]


def exchanged_bytes(size: ModelSize, phase: SplitPhase, shapes: Shapes, parts: int) -> float:
    """Bytes an IPU receives over IPU-Links in one phase's forward and backward for one
    micro-batch: the column chunks of the others' normalised input (gathered) and of their partial
    outputs (added up), in both directions of the pass."""
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    share = (parts - 1) / parts
    length = s if phase.stack == "encoder" else t
    whole = m * length * size.d_model * a
    if phase.kind == "embedding":
        per_pass = share * m * (s + t) * size.d_model * a
    elif phase.kind == "lm_head":
        per_pass = share * whole
    else:
        per_pass = 2 * share * whole
        if phase.kind == "cross_attention":
            per_pass += share * m * s * size.d_model * a
    return 2 * per_pass


def split_cost(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, slices: int,
               micro_batches: int, replicas: int, shards: int, phasing: str, global_batch: int,
               rates: Rates = BASE_RATES) -> StepCost:
    """The step of phased execution: `phases` in order, each split over `parts` IPUs (all the
    replica's under serial phasing, one of two alternating groups under parallel phasing)."""
    weight = shapes.activation_bytes
    m = shapes.micro_batch_size
    per_phase = []
    for phase in phases:
        flops = TRAINING_PASSES * m * phase_flops(size, phase, shapes.source_length, shapes.target_length) / parts
        # Weights in for the forward and again for the backward; accumulators in and out when
        # several micro-batches add up; what the backward needs of the forward, out and back in.
        streamed = 2 * weight * phase.share / shards + 2 * split_saved(size, phase, shapes, parts, slices)
        if micro_batches > 1:
            streamed += 2 * weight * phase.share
        exchanged = exchanged_bytes(size, phase, shapes, parts)
        if shards > 1:  # each replica loads its shard of the weights and gathers the rest
            exchanged += 2 * weight * phase.share * (shards - 1) / shards
        per_phase.append((flops, streamed, exchanged))
    # An IPU under parallel phasing takes part in every other phase: the busier group's.
    group = 0 if phasing == "serial" or sum(p[0] for p in per_phase[::2]) >= sum(p[0] for p in per_phase[1::2]) else 1
    step_by = 1 if phasing == "serial" else 2
    mine = per_phase[group::step_by]
    params = sum(p.share for p in phases[group::step_by])
    # Once per step: the update reads the accumulators, and reads and writes weights and moments.
    update = (weight * params if micro_batches > 1 else 0) + 2 * (weight + OPTIMIZER_BYTES_PER_PARAM) * params / shards
    reduction = 0.0
    if replicas > 1:
        reduction = (1 if shards > 1 else 2) * (replicas - 1) / replicas * weight * params
    flops = micro_batches * sum(p[0] for p in mine)
    streamed = micro_batches * sum(p[1] for p in mine) + update
    exchanged = micro_batches * sum(p[2] for p in mine) + reduction
    times = [term_seconds(*p, rates=rates) for p in per_phase]
    compute = micro_batches * sum(c for c, _, _ in times)
    streaming = micro_batches * sum(w for _, w, _ in times) + update / rates.streaming_bytes_per_second
    exchange = micro_batches * sum(x for _, _, x in times) + reduction / rates.link_bytes_per_second
    if phasing == "serial":
        step = compute + streaming + exchange
    else:
        # While one group computes a phase the other streams in the next one.
        overlapped = sum(max(c + x, w) for c, w, x in times)
        step = (micro_batches * overlapped + update / rates.streaming_bytes_per_second
                + reduction / rates.link_bytes_per_second)
    return StepCost(flops, streamed, exchanged, compute, streaming, exchange, step, global_batch / step)


def pipelined_cost(size: ModelSize, stage_flops: float, stage_params: int, stages: int, shapes: Shapes,
                   micro_batches: int, replicas: int, shards: int, optimizer_offchip: bool, recompute: bool,
                   global_batch: int, rates: Rates = BASE_RATES) -> StepCost:
    """The step of pipelined execution on its slowest stage (`stage_flops` forward FLOPs per
    sample, `stage_params` parameters): weights stay on chip; stages pass the float32 stream
    forward and its gradient back; the pipeline idles (stages - 1) of (micro-batches + stages - 1)."""
    weight, m = shapes.activation_bytes, shapes.micro_batch_size
    flops = (TRAINING_PASSES + (1 if recompute else 0)) * micro_batches * m * stage_flops
    streamed = 2 * OPTIMIZER_BYTES_PER_PARAM * stage_params / shards if optimizer_offchip else 0
    exchanged = 2 * micro_batches * m * shapes.source_length * size.d_model * 4 if stages > 1 else 0
    if replicas > 1:
        exchanged += 2 * (replicas - 1) / replicas * weight * stage_params
    compute, streaming, exchange = term_seconds(flops, streamed, exchanged, rates)
    compute *= (micro_batches + stages - 1) / micro_batches
    step = compute + streaming + exchange
    return StepCost(flops, streamed, exchanged, compute, streaming, exchange, step, global_batch / step)
