"""What each Graphcore IPU must hold to train a Flan-T5 under a layout: per-IPU byte arithmetic.

Pure arithmetic on the size registry (`ipu_t5.models`): no torch, no weights, no IPU. An IPU
(Mk2 GC200, also Bow) has 900 MB of on-chip SRAM shared by code, tensors and temporaries; what
does not fit lives in Streaming Memory (DRAM beside the IPUs) and is brought in when needed.

Two ways to place the model:
- pipelined execution: one *piece* per plan block (`encoder.3`, `embedding`, ...) on its stage's
  IPU; every piece's weights, gradient accumulators and (unless streamed) optimizer state stay on
  chip, and each IPU stashes the inputs of the micro-batches in flight in the pipeline;
- phased execution: one *phase* per sub-layer (self-attention, cross-attention, feed-forward; the
  embedding and the LM head), each split over the IPUs of its phase (q, k, v by heads and o by the
  matching input columns; wi_0, wi_1 by inner units and wo by the matching input rows; the
  vocabulary in slices). Every IPU of the phase computes a partial output of the whole sub-layer,
  and the partial outputs are summed by columns of the hidden dimension: IPU j adds the j-th
  column chunk of every partial to its chunk of the residual stream, so the stream itself stays
  split by columns and no weight is used on two IPUs. A phase's weight shares, accumulators and
  optimizer state are streamed in for it and out after it, so an IPU holds one phase at a time.

Bytes counted on chip, at the peak:
- weights: 2 per parameter in float16 (4 in float32);
- gradients: the gradient accumulators of those weights, in the weights' type;
- optimizer: AdamW's two moments in float32, 8 per parameter, when on chip; when streamed, only
  the largest tensor's moments are on chip during its update, split over the replicas by
  replicated tensor sharding (RTS) when there is more than one;
- activations: the working set of the largest piece or phase for one micro-batch, twice (forward
  values and their gradients in the backward pass), plus, when pipelined, the stashed inputs of
  every micro-batch in flight: IPU i of N holds 2(N - i) - 1 of them (with recomputation only block
  inputs are stashed, without it every activation);
- partial sums (phased): the IPU's partial output of its phase and the column chunks of the other
  IPUs' partials it receives to add, twice (forward and backward);
- working: matmul temporaries (up to `matmul_proportion` of the SRAM) plus RESERVED_BYTES for
  code, exchange and stream buffers.
The kinds are added as if all were live at once (the backward pass and the weight update do not
overlap, so this errs high). These are estimates for choosing a layout before a compile;
Poplar's memory report after compiling is the authority.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ...models import ModelSize
# Shapes is imported from here by the IPU planner and cost model.
from ...t5_shapes import FLOAT32, Shapes, block_part, part_activations, vocab_slice  # noqa: F401

SRAM_BYTES = 900 * 10 ** 6
# Code, exchange buffers and host/stream buffers: an estimate, not a measurement.
RESERVED_BYTES = 100 * 10 ** 6
# AdamW's first and second moments, both float32.
OPTIMIZER_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class Piece:
    """One poptorch block of pipelined execution: part of the model placed on one IPU."""

    name: str
    # The plan blocks it carries: "encoder.23" and "encoder.final_layer_norm", say.
    blocks: Tuple[str, ...]
    kind: str
    ipu: int
    params: int
    # Elements of its largest single tensor (what a streamed update brings in at once).
    largest: int
    # "encoder" pieces (and the embedding) work on source tokens, "decoder" ones on target tokens.
    stack: str


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter for weights and gradient accumulators, and how state is placed."""

    weight: int
    optimizer_offchip: bool
    # Replicas the streamed weights and optimizer state are sharded over (1: no sharding).
    shards: int
    matmul_proportion: float
    recompute: bool


@dataclass(frozen=True)
class IpuMemory:
    """What one IPU of a replica holds at its peak, in bytes, and what it keeps streamed."""

    ipu: int
    blocks: Tuple[str, ...]
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    working: int
    streamed: int
    # Phased execution: the phase at which the peak occurs, and the partial-sum buffers there.
    peak_piece: Optional[str] = None
    partials: int = 0

    @property
    def onchip(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.partials + self.working

    @property
    def fits(self) -> bool:
        return self.onchip <= SRAM_BYTES


def pipelined_pieces(size: ModelSize, stage_blocks: Sequence[Sequence[str]], slices: int) -> List[Piece]:
    """Pieces in execution order for pipelined execution: one per plan block."""
    pieces = []
    for ipu, blocks in enumerate(stage_blocks):
        for block in blocks:
            kind, stack = block_part(block)
            if kind in ("embedding", "lm_head"):
                largest = vocab_slice(size, slices) * size.d_model
            elif kind == "norm":
                largest = size.d_model
            else:
                largest = size.d_model * size.d_ff
            pieces.append(Piece(block, (block,), kind, ipu, size.block_params(block), largest, stack))
    return pieces


def working_activations(size: ModelSize, piece: Piece, shapes: Shapes, slices: int) -> int:
    """Bytes of activations a piece computes for one micro-batch (forward values only)."""
    return part_activations(size, piece.kind, piece.stack, shapes, slices)


def stashed_inputs(size: ModelSize, pieces: Sequence[Piece], shapes: Shapes, recompute: bool, slices: int) -> int:
    """Bytes one micro-batch in flight leaves stashed on an IPU holding `pieces` (pipelined)."""
    if not recompute:
        return sum(working_activations(size, p, shapes, slices) for p in pieces)
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    heads, d = size.num_heads, size.d_model
    stacks = {p.stack for p in pieces if p.kind == "block"}
    total = sum(m * (s if p.stack == "encoder" else t) * d * FLOAT32 for p in pieces if p.kind == "block")
    if "encoder" in stacks:
        # The position bias (with the mask) computed by encoder.0 feeds every encoder block.
        total += m * heads * s * s * a
    if "decoder" in stacks:
        # Every decoder block reads the encoder output, its own position bias and the source mask.
        total += m * s * d * a + m * heads * t * t * a + m * s * a
    return total


def _working(state: StateBytes) -> int:
    return int(state.matmul_proportion * SRAM_BYTES) + RESERVED_BYTES


def _blocks(pieces: Sequence[Piece]) -> Tuple[str, ...]:
    seen: List[str] = []
    for piece in pieces:
        seen += [b for b in piece.blocks if b not in seen]
    return tuple(seen)


def pipelined_ipu(size: ModelSize, ipu: int, stages: int, pieces: Sequence[Piece], shapes: Shapes,
                  state: StateBytes, slices: int) -> IpuMemory:
    """An IPU's memory when it runs its pieces as one pipeline stage of `stages`."""
    params = sum(p.params for p in pieces)
    largest = max(p.largest for p in pieces)
    in_flight = 2 * (stages - ipu) - 1
    work = max(working_activations(size, p, shapes, slices) for p in pieces)
    activations = in_flight * stashed_inputs(size, pieces, shapes, state.recompute, slices) + 2 * work
    if state.optimizer_offchip:
        optimizer = OPTIMIZER_BYTES_PER_PARAM * largest // state.shards
        streamed = OPTIMIZER_BYTES_PER_PARAM * params // state.shards
    else:
        optimizer, streamed = OPTIMIZER_BYTES_PER_PARAM * params, 0
    return IpuMemory(ipu=ipu, blocks=_blocks(pieces), params=params, weights=state.weight * params,
                     gradients=state.weight * params, optimizer=optimizer, activations=activations,
                     working=_working(state), streamed=streamed)


# ----- phased execution: every phase split over the IPUs of its group -----

SUBLAYERS = {"encoder": ("attention", "ff"), "decoder": ("self_attention", "cross_attention", "ff")}


@dataclass(frozen=True)
class SplitPhase:
    """One phase of phased execution: a sub-layer (or the embedding, or the LM head) whose weights
    are split over the IPUs of the phase, each computing a partial output."""

    name: str
    kind: str
    stack: str
    # The plan blocks it carries: "encoder.23" and "encoder.final_layer_norm", say.
    blocks: Tuple[str, ...]
    params: int
    # Parameters on each IPU of the phase, and the elements of its largest tensor there.
    share: int
    largest: int


def split_phases(size: ModelSize, parts: int, slices: int) -> List[SplitPhase]:
    """The phases in execution order, each split `parts` ways (`slices` vocabulary slices for the
    embedding and the LM head, `slices // parts` on each IPU). A final layer norm rides in the last
    feed-forward phase of its stack, where T5 runs it."""
    d, inner, ff = size.d_model, size.inner_dim, size.d_ff
    rows = vocab_slice(size, slices) * (slices // parts)
    vocab = SplitPhase("embedding", "embedding", "encoder", ("embedding",), size.vocab_size * d, rows * d,
                       vocab_slice(size, slices) * d)
    phases = [vocab]
    for block in size.block_names:
        stack, index = block.split(".")
        bias = size.relative_attention_num_buckets * size.num_heads if index == "0" else 0
        for sub in SUBLAYERS[stack]:
            if sub == "ff":
                params, largest = 3 * d * ff + d, d * ff // parts
            else:
                params, largest = 4 * d * inner + d + (bias if sub != "cross_attention" else 0), d * inner // parts
            kind = "attention" if sub in ("attention", "self_attention") else sub
            phases.append(SplitPhase("{}.{}".format(block, sub), kind, stack, (block,), params, params // parts,
                                     largest))
        if int(index) == (size.num_layers if stack == "encoder" else size.num_decoder_layers) - 1:
            last = phases[-1]
            phases[-1] = SplitPhase(last.name, last.kind, stack, last.blocks + (stack + ".final_layer_norm",),
                                    last.params + d, last.share + d // parts, last.largest)
    phases.append(SplitPhase("lm_head", "lm_head", "decoder", ("lm_head",), size.vocab_size * d, rows * d,
                             vocab_slice(size, slices) * d))
    return phases


def split_activations(size: ModelSize, phase: SplitPhase, shapes: Shapes, parts: int, slices: int,
                      first: bool) -> Tuple[int, int]:
    """(activations, partial-sum buffers) in bytes on an IPU of a phase split `parts` ways, for
    one micro-batch, forward values only. `first`: the IPU holds part 0, which combines the LM
    head's slices into the loss."""
    d, inner, ff = size.d_model, size.inner_dim, size.d_ff
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    heads = size.num_heads // parts
    length = s if phase.stack == "encoder" else t
    if phase.kind == "embedding":
        mine = slices // parts
        # Its slices' partial embeddings of source and target, the column chunks of every other
        # slice's partials it adds up, and its float32 chunks of both streams.
        return (mine * m * (s + t) * d * a + m * (s + t) * d // parts * FLOAT32,
                (slices - mine) * m * (s + t) * d // parts * a)
    if phase.kind == "lm_head":
        mine = slices // parts
        # The gathered decoder output, its slices' logits in float32; part 0 stacks every slice's
        # log-sum-exp and target logit.
        combine = 2 * slices * m * t * FLOAT32 if first else 0
        return m * t * d * a + mine * m * t * vocab_slice(size, slices) * FLOAT32 + combine, 0
    # Every sub-layer: its float32 chunk of the stream and its normalised chunk, the gathered
    # normalised input; then its own partial output and the chunks of the others' partials.
    common = m * length * d // parts * (2 * FLOAT32 + a) + m * length * d * a
    partials = m * length * d * a + (parts - 1) * m * length * d // parts * a
    if phase.kind == "attention":
        # q, k, v, context of its heads; float32 scores, softmax output; the position bias with mask.
        work = 4 * m * length * inner // parts * a + m * heads * length * length * (FLOAT32 + 2 * a)
    elif phase.kind == "cross_attention":
        # The gathered encoder output feeds k and v.
        work = (m * s * d * a + 2 * m * (s + t) * inner // parts * a + m * heads * t * s * (FLOAT32 + 2 * a))
    else:
        # wi_0 and wi_1 outputs and their gated product, for its inner units.
        work = 3 * m * length * ff // parts * a
    return common + work, partials


def split_saved(size: ModelSize, phase: SplitPhase, shapes: Shapes, parts: int, slices: int) -> int:
    """Bytes of one micro-batch's forward values an IPU of a phase keeps for the backward pass
    (streamed out after the phase and back in for its backward): what the gradients need."""
    d, inner, ff = size.d_model, size.inner_dim, size.d_ff
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    heads = size.num_heads // parts
    length = s if phase.stack == "encoder" else t
    if phase.kind == "embedding":
        return 0  # the token ids alone
    if phase.kind == "lm_head":
        # The gathered decoder output and its slices' float32 logits.
        return m * t * d * a + slices // parts * m * t * vocab_slice(size, slices) * FLOAT32
    # The layer norm's float32 input chunk and the gathered normalised input.
    saved = m * length * d // parts * FLOAT32 + m * length * d * a
    if phase.kind == "attention":
        # q, k, v, context and the softmax output of its heads.
        return saved + 4 * m * length * inner // parts * a + m * heads * length * length * a
    if phase.kind == "cross_attention":
        return (saved + m * s * d * a + 2 * m * (s + t) * inner // parts * a + m * heads * t * s * a)
    # wi_0 and wi_1 outputs, the activation and the gated product that enters wo.
    return saved + 4 * m * length * ff // parts * a


def split_ipu(size: ModelSize, ipu: int, phases: Sequence[SplitPhase], part: int, parts: int, shapes: Shapes,
              state: StateBytes, slices: int) -> IpuMemory:
    """An IPU's memory at its fullest phase, when it holds part `part` of each of `phases` (the
    phases it takes part in) and each phase's state is streamed in for it."""
    params = sum(p.share for p in phases)
    working = _working(state)
    rows = []
    for phase in phases:
        activations, partials = split_activations(size, phase, shapes, parts, slices, part == 0)
        rows.append(IpuMemory(
            ipu=ipu, blocks=("all (1/{} of each phase)".format(parts),), params=params,
            weights=state.weight * phase.share, gradients=state.weight * phase.share,
            optimizer=OPTIMIZER_BYTES_PER_PARAM * phase.largest // state.shards, activations=2 * activations,
            partials=2 * partials, working=working, streamed=streamed_state(params, state), peak_piece=phase.name))
    return max(rows, key=lambda row: row.onchip)


def streamed_state(params: int, state: StateBytes) -> int:
    """Bytes an IPU keeps in Streaming Memory for `params` parameters: weights and AdamW moments
    (sharded over the replicas by RTS) and float16 gradient accumulators (whole)."""
    return (state.weight * params) // state.shards + state.weight * params + OPTIMIZER_BYTES_PER_PARAM * params // state.shards
