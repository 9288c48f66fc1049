"""Activation bytes of Flan-T5's parts for one micro-batch: pure arithmetic on the size registry
(`ipu_t5.models`), shared by the IPU planner and the torch backend's memory plan. No torch, no
engine: `ipu-t5 plan` runs it on both software stacks.

A part is a plan block (`encoder.3`, `decoder.0`, `embedding`, `lm_head`, a final layer norm) or,
for the IPU's phases, one sub-layer of a block. The counts are the tensors its forward pass
computes (what autograd keeps for the backward pass, without recomputation), in the activations'
type, except what T5 keeps in float32 whatever the weights' type: the residual stream and the
attention scores' softmax input.
"""
from dataclasses import dataclass
from typing import Tuple

from .models import ModelSize

# Bytes of a float32 value: the residual stream, softmax scores and logits stay float32.
FLOAT32 = 4


@dataclass(frozen=True)
class Shapes:
    """The tensors' sizes: micro-batch, token lengths, and the bytes of one activation value."""

    micro_batch_size: int
    source_length: int
    target_length: int
    activation_bytes: int


def block_part(block: str) -> Tuple[str, str]:
    """(kind, stack) of a plan block: kind is embedding, lm_head, norm or block; stack is the side
    whose tokens it works on ("encoder" for the embedding, "decoder" for the LM head)."""
    if block == "embedding":
        return "embedding", "encoder"
    if block == "lm_head":
        return "lm_head", "decoder"
    if block.endswith("final_layer_norm"):
        return "norm", block.split(".")[0]
    return "block", block.split(".")[0]


def vocab_slice(size: ModelSize, slices: int) -> int:
    """Rows of each of `slices` equal vocabulary slices of the embedding and the LM head."""
    return size.vocab_size // slices


def part_activations(size: ModelSize, kind: str, stack: str, shapes: Shapes, slices: int = 1) -> int:
    """Bytes of activations a part of kind `kind` on `stack` computes for one micro-batch (forward
    values only); `slices`: vocabulary slices of the embedding and the LM head."""
    d, inner, ff, heads = size.d_model, size.inner_dim, size.d_ff, size.num_heads
    m, s, t, a = shapes.micro_batch_size, shapes.source_length, shapes.target_length, shapes.activation_bytes
    length = s if stack == "encoder" else t
    # The residual stream stays float32; a layer norm's output is in the activations' type.
    stream = m * length * d * (FLOAT32 + a)
    if kind == "embedding":
        # Source and target lookups, and the running sums over vocabulary slices.
        return 2 * m * (s + t) * d * a
    if kind == "lm_head":
        # This slice's logits in float32; the loss needs the whole row, held by the last slice.
        return m * t * (d * a + vocab_slice(size, slices) * FLOAT32) + 2 * m * t * size.vocab_size * FLOAT32
    if kind == "norm":
        return stream
    if kind == "attention":
        # q, k, v, context; float32 scores, softmax output; position bias with the mask.
        return stream + 4 * m * length * inner * a + m * heads * length * length * (FLOAT32 + 2 * a)
    if kind == "cross_attention":
        return (stream + 2 * m * t * inner * a + 2 * m * s * inner * a + m * s * d * a
                + m * heads * t * s * (FLOAT32 + 2 * a))
    if kind == "ff_in":
        # wi_0 and wi_1 outputs and their gated product.
        return stream + 3 * m * length * ff * a
    if kind == "ff_out":
        return m * length * (ff * a + 2 * d * FLOAT32)
    # A whole block: the sum of its sub-layers.
    kinds = ("attention", "ff_in", "ff_out") if stack == "encoder" else \
        ("attention", "cross_attention", "ff_in", "ff_out")
    return sum(part_activations(size, sub, stack, shapes, slices) for sub in kinds)
