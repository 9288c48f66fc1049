"""What each Graphcore IPU must hold to train a Flan-T5 under a layout: per-IPU byte arithmetic.

Pure arithmetic on the size registry (`ipu_t5.models`): no torch, no weights, no IPU. An IPU
(Mk2 GC200, also Bow) has 900 MB of on-chip SRAM shared by code, tensors and temporaries; what
does not fit lives in Streaming Memory (DRAM beside the IPUs) and is brought in when needed.

The model is cut into *pieces*, each one poptorch block on one IPU:
- pipelined execution: one piece per plan block (`encoder.3`, `embedding`, ...); every piece's
  weights, gradient accumulators and (unless streamed) optimizer state stay on chip, and each IPU
  stashes the inputs of the micro-batches in flight in the pipeline;
- phased execution: blocks are cut finer (self-attention, cross-attention, the feed-forward input
  projections `wi_0`/`wi_1`, the output projection `wo`; the embedding and LM head in vocabulary
  slices); each piece is a phase whose weights, accumulators and optimizer state are streamed in
  for it and out after it, so an IPU holds one piece at a time.

Bytes counted on chip, at the peak:
- weights: 2 per parameter in float16 (4 in float32);
- gradients: the gradient accumulators of those weights, in the weights' type;
- optimizer: AdamW's two moments in float32, 8 per parameter, when on chip; when streamed, only
  the largest tensor's moments are on chip during its update, split over the replicas by
  replicated tensor sharding (RTS) when there is more than one;
- activations: the working set of the largest piece for one micro-batch, twice (forward values
  and their gradients in the backward pass), plus, when pipelined, the stashed inputs of every
  micro-batch in flight: IPU i of N holds 2(N - i) - 1 of them (with recomputation only block
  inputs are stashed, without it every activation);
- working: matmul temporaries (up to `matmul_proportion` of the SRAM) plus RESERVED_BYTES for
  code, exchange and stream buffers.
The kinds are added as if all were live at once (the backward pass and the weight update do not
overlap, so this errs high). These are estimates for choosing a layout before a compile;
Poplar's memory report after compiling is the authority.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ...models import ModelSize

SRAM_BYTES = 900 * 10 ** 6
# Code, exchange buffers and host/stream buffers: an estimate, not a measurement.
RESERVED_BYTES = 100 * 10 ** 6
# AdamW's first and second moments, both float32.
OPTIMIZER_BYTES_PER_PARAM = 8
# Accumulation of float32 softmax scores and float32 residual stream, whatever the weights' type.
FLOAT32 = 4


@dataclass(frozen=True)
class Shapes:
    """The tensors' sizes: micro-batch, token lengths, and the bytes of one activation value."""

    micro_batch_size: int
    source_length: int
    target_length: int
    activation_bytes: int


@dataclass(frozen=True)
class Piece:
    """One poptorch block: part of the model placed on one IPU (one phase in phased execution)."""

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
    # Phased execution: the piece at which the peak occurs.
    peak_piece: Optional[str] = None

    @property
    def onchip(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.working

    @property
    def fits(self) -> bool:
        return self.onchip <= SRAM_BYTES


def vocab_slice(size: ModelSize, slices: int) -> int:
    """Rows of each of `slices` equal vocabulary slices of the embedding and the LM head."""
    return size.vocab_size // slices


def _block_pieces(size: ModelSize, block: str, ipu: int) -> List[Piece]:
    """A T5 block cut into its sub-layers (the phased cut)."""
    d, inner, ff = size.d_model, size.inner_dim, size.d_ff
    stack, index = block.split(".")
    bias = size.relative_attention_num_buckets * size.num_heads if index == "0" else 0
    attention = 4 * d * inner + d
    pieces = [Piece(block + (".attention" if stack == "encoder" else ".self_attention"), (block,),
                    "attention", ipu, attention + bias, d * inner, stack)]
    if stack == "decoder":
        pieces.append(Piece(block + ".cross_attention", (block,), "cross_attention", ipu, attention,
                            d * inner, stack))
    pieces.append(Piece(block + ".ff_in", (block,), "ff_in", ipu, 2 * d * ff + d, d * ff, stack))
    pieces.append(Piece(block + ".ff_out", (block,), "ff_out", ipu, ff * d, ff * d, stack))
    return pieces


def phased_pieces(size: ModelSize, stage_blocks: Sequence[Sequence[str]], slices: int) -> List[Piece]:
    """Pieces in execution order for phased execution; each stays on its plan block's IPU. The
    final layer norms ride in the piece before them, where T5 runs them."""
    pieces: List[Piece] = []
    rows = vocab_slice(size, slices)
    for ipu, blocks in enumerate(stage_blocks):
        for block in blocks:
            if block in ("embedding", "lm_head"):
                stack = "encoder" if block == "embedding" else "decoder"
                pieces += [Piece("{}.{}".format(block, c), (block,), block, ipu, rows * size.d_model,
                                 rows * size.d_model, stack) for c in range(slices)]
            elif block.endswith("final_layer_norm"):
                last = pieces[-1]
                pieces[-1] = Piece(last.name, last.blocks + (block,), last.kind, last.ipu,
                                   last.params + size.d_model, last.largest, last.stack)
            else:
                pieces += _block_pieces(size, block, ipu)
    return pieces


def pipelined_pieces(size: ModelSize, stage_blocks: Sequence[Sequence[str]], slices: int) -> List[Piece]:
    """Pieces in execution order for pipelined execution: one per plan block."""
    pieces = []
    for ipu, blocks in enumerate(stage_blocks):
        for block in blocks:
            if block in ("embedding", "lm_head"):
                largest, kind = vocab_slice(size, slices) * size.d_model, block
                stack = "encoder" if block == "embedding" else "decoder"
            elif block.endswith("final_layer_norm"):
                largest, kind, stack = size.d_model, "norm", block.split(".")[0]
            else:
                largest, kind, stack = size.d_model * size.d_ff, "block", block.split(".")[0]
            pieces.append(Piece(block, (block,), kind, ipu, size.block_params(block), largest, stack))
    return pieces


def working_activations(size: ModelSize, piece: Piece, shapes: Shapes, slices: int) -> int:
    """Bytes of activations a piece computes for one micro-batch (forward values only)."""
    d, inner, ff, heads = size.d_model, size.inner_dim, size.d_ff, size.num_heads
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    length = s if piece.stack == "encoder" else t
    # The residual stream stays float32; a layer norm's output is in the activations' type.
    stream = m * length * d * (FLOAT32 + a)
    if piece.kind == "embedding":
        # Source and target lookups, and the running sums over vocabulary slices.
        return 2 * m * (s + t) * d * a
    if piece.kind == "lm_head":
        # This slice's logits in float32; the loss needs the whole row, held by the last slice.
        return m * t * (d * a + vocab_slice(size, slices) * FLOAT32) + 2 * m * t * size.vocab_size * FLOAT32
    if piece.kind == "norm":
        return stream
    if piece.kind == "attention":
        # q, k, v, context; float32 scores, softmax output; position bias with the mask.
        return stream + 4 * m * length * inner * a + m * heads * length * length * (FLOAT32 + 2 * a)
    if piece.kind == "cross_attention":
        return (stream + 2 * m * t * inner * a + 2 * m * s * inner * a + m * s * d * a
                + m * heads * t * s * (FLOAT32 + 2 * a))
    if piece.kind == "ff_in":
        # wi_0 and wi_1 outputs and their gated product.
        return stream + 3 * m * length * ff * a
    if piece.kind == "ff_out":
        return m * length * (ff * a + 2 * d * FLOAT32)
    # A whole block: the sum of its sub-layers.
    return sum(working_activations(size, p, shapes, slices) for p in _block_pieces(size, piece.name, piece.ipu))


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


def phased_ipu(size: ModelSize, ipu: int, pieces: Sequence[Piece], shapes: Shapes, state: StateBytes,
               slices: int) -> IpuMemory:
    """An IPU's memory when its pieces are phases streamed in one at a time: the largest piece."""
    params = sum(p.params for p in pieces)
    working = _working(state)
    rows = []
    for piece in pieces:
        rows.append(IpuMemory(
            ipu=ipu, blocks=_blocks(pieces), params=params, weights=state.weight * piece.params,
            gradients=state.weight * piece.params,
            optimizer=OPTIMIZER_BYTES_PER_PARAM * piece.largest // state.shards,
            activations=2 * working_activations(size, piece, shapes, slices), working=working,
            streamed=(state.weight * params) // state.shards + state.weight * params
            + OPTIMIZER_BYTES_PER_PARAM * params // state.shards,
            peak_piece=piece.name))
    return max(rows, key=lambda row: row.onchip)
