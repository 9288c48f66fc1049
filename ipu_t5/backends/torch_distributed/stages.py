"""T5 cut into pipeline chunks: hand-written modules that own a contiguous run of the plan's blocks.

A chunk keeps Hugging Face's own submodules under Hugging Face's names (`encoder.block.3...`,
`shared`, `lm_head`), so `named_parameters()` are HF names and checkpoints stay layout-free. The
attention is written here over HF's projection weights (the layer norms and feed-forward layers
are HF's modules), which keeps the cut identical on transformers 4.x and 5.x and gives generation
a key/value cache per chunk.

What crosses a chunk boundary depends on where it falls (`boundary_kind`):

- inside the encoder: hidden states, the encoder's relative position bias (computed once by
  `encoder.0` and reused by every later block), the attention mask, the embedded decoder inputs;
- between the encoder and the decoder: the encoder output, the attention mask, the embedded
  decoder inputs;
- inside the decoder: hidden states, the decoder's position bias, the encoder output (every
  decoder block attends to it), the attention mask.

The shared embedding is held only by the chunk with the encoder embedding (`embedding`): it also
embeds the decoder input ids and sends their float32 embeddings down the pipeline to the chunk with
`decoder.0`, which applies the dropout Hugging Face applies there. Their gradient comes back through
the schedule like any activation's, so the one embedding sums both uses' gradients as one process
does, and no rank holds a copy of it (for XXL 131M parameters and their gradient).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import scales_decoder_output
from ...prompt_tuning import extend_mask, prepend

INPUT, ENCODER, ENCODED, DECODER, LOGITS = "input", "encoder", "encoded", "decoder", "logits"

# What each boundary carries, in order.
CARRIED = {
    INPUT: ("input_ids", "attention_mask", "decoder_input_ids"),
    ENCODER: ("hidden", "encoder_bias", "attention_mask", "decoder_embeds"),
    ENCODED: ("encoder_output", "attention_mask", "decoder_embeds"),
    DECODER: ("hidden", "decoder_bias", "encoder_output", "attention_mask"),
    LOGITS: ("logits",),
}


def _index(block: str) -> Optional[int]:
    """`encoder.3` -> 3; embedding, final layer norms and the LM head -> None."""
    stack, _, rest = block.partition(".")
    return int(rest) if stack in ("encoder", "decoder") and rest.isdigit() else None


def boundary_kind(blocks: Sequence[str], num_layers: int) -> str:
    """What flows out of a chunk whose last part is `blocks[-1]`."""
    last = blocks[-1]
    if last == "lm_head":
        return LOGITS
    if last == "encoder.final_layer_norm":
        return ENCODED
    if last.startswith("encoder."):
        if _index(last) == num_layers - 1:
            raise ValueError("the encoder's final layer norm must sit with its last block")
        return ENCODER
    return DECODER


def autocast_region(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device_type`, or a region that changes nothing where `dtype` is None."""
    return torch.autocast(device_type=device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def relative_bias(attention: nn.Module, query_length: int, key_length: int, past: int = 0) -> torch.Tensor:
    """T5's relative position bias, (1, heads, query, key), from the block-0 attention that owns
    the bucket embedding; `past` offsets the queries (generation with a cache)."""
    weight = attention.relative_attention_bias.weight
    context = torch.arange(query_length, dtype=torch.long, device=weight.device)[:, None] + past
    memory = torch.arange(key_length, dtype=torch.long, device=weight.device)[None, :]
    buckets = attention._relative_position_bucket(
        memory - context, bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance)
    return attention.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()


def masked(bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The additive attention bias with masked positions at the dtype's minimum (as HF does)."""
    return torch.where(keep, bias, torch.tensor(torch.finfo(bias.dtype).min, dtype=bias.dtype, device=bias.device))


def cross_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, 1, source) additive mask over padded encoder positions."""
    zeros = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return masked(zeros, attention_mask.bool()[:, None, None, :])


def _heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, attention.n_heads, attention.key_value_proj_dim).transpose(1, 2)


def _attend(attention: nn.Module, query_input: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """T5 attention: unscaled dot products plus the additive bias, then the output projection."""
    query = _heads(attention.q(query_input), attention)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.to(query.dtype), scale=1.0,
        dropout_p=attention.dropout if attention.training else 0.0)
    return attention.o(out.transpose(1, 2).reshape(query_input.shape[0], query_input.shape[1], -1))


def key_value(attention: nn.Module, source: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `source`, split into heads."""
    return _heads(attention.k(source), attention), _heads(attention.v(source), attention)


def self_attention(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor,
                   cache: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Pre-norm self-attention sublayer with its residual; `cache` ([keys, values]) grows in place."""
    normed = layer.layer_norm(hidden)
    key, value = key_value(layer.SelfAttention, normed)
    if cache is not None:
        if cache:
            key, value = torch.cat([cache[0], key], dim=2), torch.cat([cache[1], value], dim=2)
        cache[:] = [key, value]
    return hidden + layer.dropout(_attend(layer.SelfAttention, normed, key, value, bias))


def cross_attention(layer: nn.Module, hidden: torch.Tensor, keys_values: Tuple[torch.Tensor, torch.Tensor],
                    bias: torch.Tensor) -> torch.Tensor:
    """Pre-norm cross-attention sublayer over the encoder's keys and values, with its residual."""
    normed = layer.layer_norm(hidden)
    return hidden + layer.dropout(_attend(layer.EncDecAttention, normed, keys_values[0], keys_values[1], bias))


def _own_position_bias(layers: nn.ModuleList, hidden: torch.Tensor, keep: torch.Tensor):
    """Block 0's relative position bias over `hidden`'s positions, from the table its
    self-attention owns, and the same under the mask `keep`."""
    bias = relative_bias(layers[0].SelfAttention, hidden.shape[1], hidden.shape[1])
    return bias, masked(bias, keep)


class EncoderBlock(nn.Module):
    """One encoder block over HF's own layers (so its parameters keep HF's names, `layer.0...`).
    Training calls it as a module, so FSDP2's hooks gather its weights just for its forward and
    backward when it is a unit of its own; block 0 therefore computes the position bias from its
    own table inside its call."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layer = block.layer

    def forward(self, hidden: torch.Tensor, masked_bias: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None):
        """`masked_bias`: the relative position bias under the attention mask (computed once per chunk
        and shared by its blocks). Block 0 gets None and the mask `keep`, makes the bias from its own
        table and returns (hidden, bias, masked bias); the others return the hidden states only (FSDP2
        hooks every tensor a unit returns, so a unit returns only what it computed)."""
        if masked_bias is None:
            bias, masked_bias = _own_position_bias(self.layer, hidden, keep)
            return self.layer[-1](self_attention(self.layer[0], hidden, masked_bias)), bias, masked_bias
        return self.layer[-1](self_attention(self.layer[0], hidden, masked_bias))


class DecoderBlock(nn.Module):
    """One decoder block over HF's own layers (see `EncoderBlock`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layer = block.layer

    def forward(self, hidden: torch.Tensor, masked_bias: Optional[torch.Tensor], encoder_output: torch.Tensor,
                cross: torch.Tensor, causal: Optional[torch.Tensor] = None):
        """As `EncoderBlock.forward` (block 0's mask is `causal`), with the encoder output it attends to."""
        made = masked_bias is None
        if made:
            bias, masked_bias = _own_position_bias(self.layer, hidden, causal)
        hidden = self_attention(self.layer[0], hidden, masked_bias)
        hidden = cross_attention(self.layer[1], hidden, key_value(self.layer[1].EncDecAttention, encoder_output), cross)
        hidden = self.layer[-1](hidden)
        return (hidden, bias, masked_bias) if made else hidden


class StageChunk(nn.Module):
    """A contiguous run of the plan's blocks of one T5, as one pipeline-stage module.

    `forward` takes and returns the tensors of `CARRIED[self.start]` / `CARRIED[self.end]`, so
    `torch.distributed.pipelining` can send them between processes; `encode`, `decode_step` and
    friends run greedy generation with a cache.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], amp_dtype: Optional[torch.dtype] = None,
                 eval_amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        config = model.config
        self.blocks = tuple(blocks)
        self.num_layers = config.num_layers
        # Autocast per stage (training, then generation): what crosses a boundary stays float32.
        self.amp_dtype, self.eval_amp_dtype = amp_dtype, eval_amp_dtype
        self.output_scale = config.d_model ** -0.5 if scales_decoder_output(config) else 1.0
        self.encoder_ids = [_index(b) for b in blocks if b.startswith("encoder.") and _index(b) is not None]
        self.decoder_ids = [_index(b) for b in blocks if b.startswith("decoder.") and _index(b) is not None]
        # The embedding's chunk embeds the encoder's and the decoder's input ids; the chunk with
        # `decoder.0` starts the decoder from the embedded decoder inputs (the same chunk or a later one).
        self.embeds_input = "embedding" in blocks
        self.starts_decoder = 0 in self.decoder_ids
        if self.embeds_input:
            self.shared = model.shared
            # A soft prompt (prompt tuning) joins the input where the embedding lives; every later
            # chunk sees the longer encoder sequence and mask.
            self.num_virtual_tokens = getattr(model, "num_virtual_tokens", 0)
            if self.num_virtual_tokens:
                self.prompt_embeddings = model.prompt_embeddings
        for stack, ids in (("encoder", self.encoder_ids), ("decoder", self.decoder_ids)):
            norm = "{}.final_layer_norm".format(stack)
            if ids or norm in blocks:
                part = nn.Module()
                if ids:
                    wrap = EncoderBlock if stack == "encoder" else DecoderBlock
                    part.block = nn.ModuleDict({str(i): wrap(getattr(model, stack).block[i]) for i in ids})
                if norm in blocks:
                    part.final_layer_norm = getattr(model, stack).final_layer_norm
                setattr(self, stack, part)
        self.has_encoder_norm = "encoder.final_layer_norm" in blocks
        self.has_head = "lm_head" in blocks
        if self.has_head:
            self.lm_head = model.lm_head
            self.decoder_norm = "decoder.final_layer_norm" in blocks
        self.dropout = nn.Dropout(config.dropout_rate)
        self.start = self._start_kind()
        self.end = boundary_kind(blocks, self.num_layers)

    def sharding_units(self) -> List[nn.Module]:
        """The modules FSDP2 can make units of: every block, the final layer norms, the embedding and
        the LM head. Each is always called as a module, so FSDP2's hooks gather it just in time;
        together they hold every parameter of the chunk."""
        units: List[nn.Module] = []
        for stack in ("encoder", "decoder"):
            part = getattr(self, stack, None)
            if part is None:
                continue
            units += list(getattr(part, "block", {}).values())
            if hasattr(part, "final_layer_norm"):
                units.append(part.final_layer_norm)
        return units + [m for m in (getattr(self, "shared", None), getattr(self, "lm_head", None)) if m is not None]

    def _start_kind(self) -> str:
        if self.embeds_input:
            return INPUT
        if self.encoder_ids:
            return ENCODER
        return ENCODED if self.starts_decoder else DECODER

    # ----- pieces shared by training and generation -----

    def _autocast(self, dtype: Optional[torch.dtype]):
        return autocast_region(next(self.parameters()).device.type, dtype)

    def _run_encoder(self, state: Dict[str, torch.Tensor]) -> None:
        if self.embeds_input:
            embedded = state.pop("input_embeds") if "input_embeds" in state else self.shared(state["input_ids"])
            if self.num_virtual_tokens:
                embedded = prepend(self.prompt_embeddings, self.num_virtual_tokens, embedded)
                state["attention_mask"] = extend_mask(state["attention_mask"], self.num_virtual_tokens)
            state["hidden"] = self.dropout(embedded)
        if self.encoder_ids:
            hidden, bias = state["hidden"], state.get("encoder_bias")
            keep = state["attention_mask"].bool()[:, None, None, :]
            masked_bias = None if bias is None else masked(bias, keep)
            for i in self.encoder_ids:
                if masked_bias is None:
                    hidden, bias, masked_bias = self.encoder.block[str(i)](hidden, None, keep)
                else:
                    hidden = self.encoder.block[str(i)](hidden, masked_bias)
            state["hidden"], state["encoder_bias"] = hidden, bias
        if self.has_encoder_norm:
            state["encoder_output"] = self.dropout(self.encoder.final_layer_norm(state.pop("hidden")))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder_norm:
            hidden = self.dropout(self.decoder.final_layer_norm(hidden))
        if self.output_scale != 1.0:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden)

    # ----- training -----

    def forward(self, *carried: torch.Tensor):
        with self._autocast(self.amp_dtype):
            state = dict(zip(CARRIED[self.start], carried))
            if self.embeds_input:
                # One lookup for the encoder's and the decoder's ids: its backward builds the dense
                # (vocabulary x d_model) gradient once per micro-batch, not once per use (+99 MB
                # at a time on the base model's first stage, 0.5 GB for XXL).
                width = state["input_ids"].shape[1]
                both = self.shared(torch.cat([state["input_ids"], state.pop("decoder_input_ids")], dim=1))
                # Contiguous, as separate lookups return them (dropout's draws follow the layout).
                state["input_embeds"] = both[:, :width].contiguous()
                state["decoder_embeds"] = both[:, width:].contiguous()
            self._run_encoder(state)
            if self.starts_decoder:
                # Where Hugging Face applies it, on the chunk with `decoder.0` as before the
                # embedding moved: the same dropout draws on the same rank.
                state["hidden"] = self.dropout(state.pop("decoder_embeds"))
            if self.decoder_ids:
                hidden, bias, encoder_output = state["hidden"], state.get("decoder_bias"), state["encoder_output"]
                depth = hidden.shape[1]
                causal = torch.ones(depth, depth, dtype=torch.bool, device=hidden.device).tril()
                enc_bias = cross_bias(state["attention_mask"], encoder_output.dtype)
                masked_bias = None if bias is None else masked(bias, causal)
                for i in self.decoder_ids:
                    block = self.decoder.block[str(i)]
                    if masked_bias is None:
                        hidden, bias, masked_bias = block(hidden, None, encoder_output, enc_bias, causal)
                    else:
                        hidden = block(hidden, masked_bias, encoder_output, enc_bias)
                state["hidden"], state["decoder_bias"] = hidden, bias
            if self.has_head:
                return self._logits(state["hidden"])
            return tuple(state[name] for name in CARRIED[self.end])

    # ----- generation -----

    @torch.no_grad()
    def encode(self, carried: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Run this chunk's encoder part on `carried` (input ids, or hidden states and the bias,
        plus the attention mask); returns what the next chunk needs for encoding."""
        state = dict(carried)
        with self._autocast(self.eval_amp_dtype):
            self._run_encoder(state)
        if "encoder_output" in state:
            return {"encoder_output": state["encoder_output"]}
        return {"hidden": state["hidden"], "encoder_bias": state["encoder_bias"]}

    @torch.no_grad()
    def start_decoding(self, encoder_output: torch.Tensor, attention_mask: torch.Tensor) -> "DecodingCache":
        """A new micro-batch's caches: every decoder block's cross-attention keys and values, and
        their (so far empty) self-attention keys and values. Each micro-batch in flight keeps its own."""
        with self._autocast(self.eval_amp_dtype):
            cross = [key_value(self.decoder.block[str(i)].layer[1].EncDecAttention, encoder_output)
                     for i in self.decoder_ids]
        return DecodingCache(cross, cross_bias(attention_mask, encoder_output.dtype), [[] for _ in self.decoder_ids])

    @torch.no_grad()
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding's chunk: the previous tokens (batch, 1) embedded, (batch, 1, d_model), for
        the chunk holding `decoder.0`."""
        with self._autocast(self.eval_amp_dtype):
            return self.shared(tokens)

    @torch.no_grad()
    def decode_step(self, position: int, hidden: torch.Tensor, decoder_bias: Optional[torch.Tensor],
                    cache: "DecodingCache"):
        """One new position of the micro-batch whose caches are `cache` through this chunk's decoder
        blocks. The chunk holding `decoder.0` takes the embedded previous tokens (`embed_tokens`);
        later chunks take its hidden states and position bias. Returns (hidden, decoder_bias) for the
        next chunk, or the logits (batch, vocab)."""
        with self._autocast(self.eval_amp_dtype):
            if self.starts_decoder:
                decoder_bias = relative_bias(self.decoder.block["0"].layer[0].SelfAttention, 1, position + 1, past=position)
            for j, i in enumerate(self.decoder_ids):
                block = self.decoder.block[str(i)]
                hidden = self_attention(block.layer[0], hidden, decoder_bias, cache.self_attention[j])
                hidden = cross_attention(block.layer[1], hidden, cache.cross[j], cache.cross_bias)
                hidden = block.layer[-1](hidden)
            if self.has_head:
                return self._logits(hidden)[:, -1]
        return hidden, decoder_bias


class DecodingCache:
    """One micro-batch's caches in one chunk: per decoder block the cross-attention keys and values
    (fixed) and the self-attention keys and values (growing a position at a time)."""

    def __init__(self, cross: List[Tuple[torch.Tensor, torch.Tensor]], cross_bias: torch.Tensor,
                 self_attention: List[List[torch.Tensor]]):
        self.cross, self.cross_bias, self.self_attention = cross, cross_bias, self_attention


def carried_shapes(kind: str, batch: int, source: int, target: int, d_model: int, heads: int,
                   vocab: int, virtual_tokens: int = 0) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype, bool]]:
    """Shape, dtype and requires_grad of every tensor a boundary carries in training; past the
    embedding, the encoder's sequence holds a soft prompt's `virtual_tokens` too."""
    float32 = torch.float32
    if kind != INPUT:
        source += virtual_tokens
    table = {
        "input_ids": ((batch, source), torch.long, False),
        "attention_mask": ((batch, source), torch.long, False),
        "decoder_input_ids": ((batch, target), torch.long, False),
        "decoder_embeds": ((batch, target, d_model), float32, True),
        "hidden": ((batch, source if kind == ENCODER else target, d_model), float32, True),
        "encoder_bias": ((1, heads, source, source), float32, True),
        "encoder_output": ((batch, source, d_model), float32, True),
        "decoder_bias": ((1, heads, target, target), float32, True),
        "logits": ((batch, target, vocab), float32, True),
    }
    return {name: table[name] for name in CARRIED[kind]}


def build_chunks(model: nn.Module, chunk_blocks: Sequence[Sequence[str]], amp_dtype: Optional[torch.dtype] = None,
                 eval_amp_dtype: Optional[torch.dtype] = None) -> List[StageChunk]:
    """One `StageChunk` per entry of `chunk_blocks`."""
    return [StageChunk(model, blocks, amp_dtype, eval_amp_dtype) for blocks in chunk_blocks]
