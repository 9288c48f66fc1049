"""Batch-serialised phases: each phase's weights come in once per step, and every sample of the
step passes through the phase while they are resident.

Under gradient accumulation PopTorch re-runs the whole phased program per micro-batch, so every
phase's weights stream in again for each micro-batch, forward and backward, and its gradient
accumulators go in and out each time (`cost.split_cost`). PopART's batch serialisation instead
takes one large micro-batch (the replica's whole share of the step, gradient accumulation 1) and
slices its batch axis into `factor` pieces inside the program: a phase loads its weights once for
the forward, runs every slice through them, and once for the backward; what a slice's backward
needs of its forward is streamed out and back in (or, with recomputation, only the phase's input
is, and the forward is run again); the gradient accumulators stay on chip for the phase's
backward and go out once. This is the schedule of Graphcore's own Flan-T5 fine-tuning
(`nlp/t5/popxl` in graphcore/examples: micro-batch 1 x 128, whole blocks per phase).

PopTorch 3.3 has no option of its own for it; PopART's session options pass through
`opts._Popart.set(key, value)` (`popart_settings`; the keys and enum values are recorded in
tests/backends/ipu/reference/popart-session-options.json with their sources).
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

from ...models import ModelSize
from .cost import BASE_RATES, TRAINING_PASSES, Rates, StepCost, exchanged_bytes, phase_flops, term_seconds
from .memory import FLOAT32, OPTIMIZER_BYTES_PER_PARAM, Shapes, SplitPhase, split_saved

# PopART's enum values (popart/sessionoptions.hpp), passed as ints through `_Popart.set`.
BATCH_SCHEDULE_ISOMORPHIC = 1
TRANSFORM_CONTEXT_FWD = 0
METHOD_UNROLL_DYNAMIC = 0
RECOMPUTATION_STANDARD = 1
# Tiles kept for streaming so loads overlap compute (the value PopART's streaming-memory tests use).
IO_TILES = 192


@dataclass(frozen=True)
class SerialSchedule:
    """How a batch-serialised step runs: `factor` slices of `slice_size` samples per replica, and
    whether the backward recomputes each phase's forward from its streamed input."""

    factor: int
    slice_size: int
    recompute: bool


def phase_traffic(size: ModelSize, phase: SplitPhase, shapes: Shapes, parts: int, slices: int,
                  recompute: bool) -> Tuple[float, float, float]:
    """(FLOPs, streamed bytes, exchanged bytes) of one slice (`shapes.micro_batch_size` samples)
    through one phase, forward and backward, on one IPU of the phase; the phase's weights and
    accumulators are counted once per step by `serial_cost`."""
    m = shapes.micro_batch_size
    flops = (TRAINING_PASSES + (1 if recompute else 0)) * m * phase_flops(
        size, phase, shapes.source_length, shapes.target_length) / parts
    exchanged = exchanged_bytes(size, phase, shapes, parts)
    if recompute:
        # Only the phase's float32 input chunk goes out and back; the forward's exchange repeats.
        length = shapes.source_length if phase.stack == "encoder" else shapes.target_length
        saved = 0 if phase.kind == "embedding" else m * length * size.d_model // parts * FLOAT32
        exchanged *= 1.5
    else:
        saved = split_saved(size, phase, shapes, parts, slices)
    return flops, 2.0 * saved, exchanged


def serial_cost(size: ModelSize, phases: Sequence[SplitPhase], shapes: Shapes, parts: int, slices: int,
                factor: int, replicas: int, shards: int, recompute: bool, global_batch: int,
                rates: Rates = BASE_RATES) -> StepCost:
    """The step of serial phases, batch-serialised: `shapes` is one slice; `factor` slices per
    replica per step. Compute, streaming and exchange follow each other (no overlap assumed)."""
    weight = shapes.activation_bytes
    flops = streamed = exchanged = 0.0
    params = 0
    for phase in phases:
        f, s, x = phase_traffic(size, phase, shapes, parts, slices, recompute)
        # Weights in for the forward and again for the backward; accumulators out once.
        streamed += factor * s + 2 * weight * phase.share / shards + weight * phase.share
        exchanged += factor * x
        if shards > 1:
            exchanged += 2 * weight * phase.share * (shards - 1) / shards
        flops += factor * f
        params += phase.share
    # The optimizer phase: accumulators in, weights and AdamW moments in and out.
    streamed += weight * params + 2 * (weight + OPTIMIZER_BYTES_PER_PARAM) * params / shards
    if replicas > 1:
        exchanged += (1 if shards > 1 else 2) * (replicas - 1) / replicas * weight * params
    compute, streaming, exchange = term_seconds(flops, streamed, exchanged, rates)
    step = compute + streaming + exchange
    return StepCost(flops, streamed, exchanged, compute, streaming, exchange, step, global_batch / step)


def slice_sizes(per_replica: int) -> List[int]:
    """Slice sizes that divide a replica's share into at least two slices, largest first."""
    return [b for b in range(per_replica // 2, 0, -1) if per_replica % b == 0]


def popart_settings(schedule: SerialSchedule) -> Dict[str, Union[int, bool]]:
    """PopART session options for a batch-serialised phased training graph, in the order set.

    The slices are concatenated nowhere between phases (each phase's outputs stay as slices, as
    PopART's streaming-memory tests set it), scheduled alike so the compiler outlines one slice's
    program and reuses it; the IO tiles stream the next slice's saved values while one computes."""
    settings: Dict[str, Union[int, bool]] = {
        "batchSerializationSettings.factor": schedule.factor,
        "batchSerializationSettings.method": METHOD_UNROLL_DYNAMIC,
        "batchSerializationSettings.transformContext": TRANSFORM_CONTEXT_FWD,
        "batchSerializationSettings.batchSchedule": BATCH_SCHEDULE_ISOMORPHIC,
        "batchSerializationSettings.concatOnVirtualGraphChange": False,
        "batchSerializationSettings.concatOnExecutionPhaseChange": False,
        "batchSerializationSettings.concatOnPipelineStageChange": False,
        "numIOTiles": IO_TILES,
    }
    if schedule.recompute:
        # Under phases PopART marks every forward op for recomputation once this is not None;
        # explicit recomputation lets the zero-copy aliasing reuse the streamed inputs.
        settings.update({"autoRecomputation": RECOMPUTATION_STANDARD, "explicitRecomputation": True,
                         "aliasZeroCopy": True})
    return settings
