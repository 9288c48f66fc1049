"""How the torch backend's pipeline generates, on paper: how many micro-batches are in flight, how
busy that keeps the stages, and the bytes of their caches. Pure arithmetic (no torch), read by the
backend (`generation.py`), the memory plan and `ipu-t5 plan --backend torch`.

The schedule (`wavefront.py`): K slots each hold one micro-batch; every tick each slot takes one step
(its encoder pass, or one decoding position), and each stage works on slot k + 1 while the next stage
works on slot k. A micro-batch leaves when its rows have ended and the next enters its slot.
"""
from typing import Iterable, List, Optional, Sequence

from ...t5_shapes import FLOAT32, block_part

# Validation batches a pipelined `generate` call takes at once: the pipeline fills and drains once
# per call, so a call of 8 batches pays (stages - 1) micro-batch steps of filling once for 8
# batches' work; the progress bar and a stop signal are seen between calls.
WINDOW_BATCHES = 8


def slots(setting: Optional[int], stages: int) -> int:
    """Micro-batches in flight per pipeline (`validation.generation_micro_batches`; None: twice the
    stages, so a stage that finishes a micro-batch early finds the next one waiting; one without a
    pipeline)."""
    if setting is not None:
        return setting
    return 2 * stages if stages > 1 else 1


def window_rows(batch_size: int, stages: int, replicas: int) -> int:
    """Prompts one pipelined `generate` call takes: a batch per replica, WINDOW_BATCHES of them
    under a pipeline."""
    return batch_size * replicas * (WINDOW_BATCHES if stages > 1 else 1)


def micro_batch_rows(rows: int, replicas: int, slots_: int, stages: int) -> int:
    """Rows per micro-batch for a call of `rows` prompts: a full call cuts each replica's batch into
    `slots_` micro-batches (so the caches in flight are one batch's); a short last call cuts finer
    so that every slot still has one."""
    batches = WINDOW_BATCHES if stages > 1 else 1
    return max(1, -(-rows // (replicas * slots_ * batches)))


def utilisation(stages: int, slots_: int, positions: int, work: Optional[Sequence[float]] = None) -> float:
    """The share of time a stage computes while one call generates, in steady state: each micro-batch
    takes `positions` steps (its encoder pass and its decoding positions); a step visits every stage
    once, so with K >= stages slots each stage always has a step to take, with K < stages it waits
    for stages - K of every `stages` visits; the pipeline fills (stages - 1 visits) once per
    micro-batch generation of K slots. Early ends only shorten `positions`. `work`: each stage's
    FLOPs for one micro-batch (`stage_work`); the pipeline moves at its busiest stage's pace, so the
    others compute mean/max of the time."""
    if stages == 1:
        return 1.0
    steps = positions * slots_
    balance = sum(work) / len(work) / max(work) if work else 1.0
    return balance * steps / (positions * max(slots_, stages) + stages - 1)


def stage_work(size, layout, source_length: int, positions: int) -> List[float]:
    """Each stage's FLOPs for one prompt's generation: its encoder blocks once, its decoder blocks'
    cross-attention keys and values once and `positions` decoding positions, the LM head at each."""
    once = source_length * 2 * 2 * size.d_model * size.inner_dim
    work = []
    for stage in range(layout.stages):
        total = 0.0
        for chunk in layout.chunks_of(stage):
            for block in layout.stage_blocks[chunk]:
                if block.startswith("encoder.") and not block.endswith("norm"):
                    total += size.block_flops(block, source_length, 1)
                elif block.startswith("decoder.") and not block.endswith("norm"):
                    total += once + positions * (sum(size.sublayer_flops(block, source_length, 1)) - once)
                elif block == "lm_head":
                    total += positions * size.block_flops(block, source_length, 1)
        work.append(total)
    return work


# Encoder passes the first stage runs ahead of their micro-batches' admission (`wavefront.py`): one
# ready for the next admission and one for an admission close behind it; each is held as sent until
# the next stage takes it.
RUN_AHEAD = 2


def _encoder_only(blocks: Iterable[str]) -> bool:
    return not any(block_part(b)[1] == "decoder" for b in blocks)


def encoder_runs_ahead(layout) -> bool:
    """Whether the first stage runs encoder passes ahead (`wavefront.py`): a pipeline of one chunk
    per stage whose first chunk holds encoder blocks only."""
    return layout.stages > 1 and layout.chunks_per_stage == 1 and _encoder_only(layout.stage_blocks[0])


def run_ahead_bytes(size, blocks: Iterable[str], rows: int, source_length: int) -> int:
    """Bytes the first stage holds for `RUN_AHEAD` encoder passes of `rows`-row micro-batches sent
    ahead, where its chunk (`blocks`) holds encoder blocks only: their hidden states (or the encoder
    output), plus the position bias over the prompt while the encoder continues on the next stage."""
    blocks = list(blocks)
    if not _encoder_only(blocks):
        return 0
    hidden = rows * source_length * size.d_model * FLOAT32
    bias = 0 if "encoder.final_layer_norm" in blocks else size.num_heads * source_length * source_length * FLOAT32
    return RUN_AHEAD * (hidden + bias)


def cache_bytes(size, blocks: Iterable[str], rows: int, source_length: int, target_length: int,
                activation_bytes: int = FLOAT32) -> int:
    """Bytes of the generation caches a stage holding `blocks` keeps for `rows` prompts in flight:
    per decoder block the cross-attention keys and values over the prompt and the self-attention
    keys and values over the generated positions; the encoder output each chunk receives."""
    inner = size.inner_dim
    decoder_blocks = sum(1 for b in blocks if block_part(b) == ("block", "decoder"))
    per_block = 2 * rows * inner * (source_length + target_length) * activation_bytes
    encoder_output = rows * source_length * size.d_model * FLOAT32 if decoder_blocks else 0
    return decoder_blocks * per_block + encoder_output
