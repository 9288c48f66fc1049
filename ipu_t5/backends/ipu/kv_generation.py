"""Greedy generation on IPUs with a key/value cache: the encoder once per batch, then the decoder one
position at a time against static-shape caches kept on the device.

Graphcore's Flan-T5 validation (and this backend's first generation path) runs the whole model for
every generated token: the encoder again each time, the decoder over every position so far. Here
two inference executors share the split model's weights (split.py):
- the encoder model takes a batch's prompts and returns the encoder output (to the host);
- the decoder-step model takes one token per sample, its position, the encoder output and the
  prompt mask, and returns the next token. Each decoder self-attention part keeps its heads' keys
  and values of earlier positions in two buffers of static shape [batch, heads, positions, d_kv]
  (PopTorch keeps an inference model's buffers on the device between calls and applies in-place
  updates to them there); a step writes its position's keys and values in with a one-hot blend,
  so every call has the same shapes, and masks the positions not written yet. Cross-attention
  keys and values are recomputed from the encoder output each step (a buffer cannot be filled
  conditionally in a static graph); the encoder output crosses the host link each step.
Slots past the current position are masked and each batch writes position 0 first, so the caches
need no reset between batches. The step runs one micro-batch per call (device iterations 1):
several micro-batches in one call would share the caches. A step streams its phases' weights in
once whatever its batch, and its working set (one position) is far smaller than the encoder's
(every prompt token), so the step takes the whole evaluation batch while the encoder runs it in
the chunks the plan found to fit (`generation_cost.py`); the host joins their outputs. The host
stops stepping once every prompt of the batch has produced the end-of-sequence token, as
transformers' greedy `generate` does. LoRA adapters are not applied on this path: an adapted
split generates through the whole-model path (backend.py).
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5Attention

from ...data.batching import collate
from ..base import trim_at_eos
from .generation_cost import kv_batch
from .split import AttentionPart, SplitT5, _wide, block_id


class CachedSelfAttention(torch.nn.Module):
    """One decoder self-attention part for one new position, against its key/value cache."""

    def __init__(self, part: AttentionPart, batch: int, positions: int, dtype: torch.dtype):
        super().__init__()
        # The part holds no parameters (its weights are read through Refs); kept unregistered so
        # this module is the only block that computes the step's self-attention.
        object.__setattr__(self, "part", part)
        self.positions = positions
        self.register_buffer("keys", torch.zeros(batch, part.heads, positions, part.d_kv, dtype=dtype))
        self.register_buffer("values", torch.zeros(batch, part.heads, positions, part.d_kv, dtype=dtype))

    def _bias_row(self, position: torch.Tensor) -> torch.Tensor:
        part = self.part
        relative = torch.arange(self.positions, dtype=torch.long, device=position.device)[None, :] - position[:, None]
        bucket = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=part.buckets,
                                                       max_distance=part.distance)
        # [1, heads, 1, positions]
        return F.embedding(bucket, part.refs("relative_attention_bias", part.index)).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, normed: Sequence[torch.Tensor], position: torch.Tensor, bias: Optional[torch.Tensor]):
        """(partial output, position bias row); `position`: the step's position, one per sample."""
        part = self.part
        x = torch.cat(list(normed), dim=-1)
        q, k, v = part._heads(x, "q", {}), part._heads(x, "k", {}), part._heads(x, "v", {})
        at = F.one_hot(position[:1], self.positions).to(k.dtype).view(1, 1, self.positions, 1)
        keys = self.keys * (1 - at) + k * at
        values = self.values * (1 - at) + v * at
        self.keys.copy_(keys)
        self.values.copy_(values)
        scores = torch.matmul(q, keys.transpose(3, 2))
        if part.has_bias:
            bias = self._bias_row(position[:1]).to(scores.dtype)
        later = torch.arange(self.positions, device=x.device)[None, :] > position[:1, None]
        additive = later.to(scores.dtype).view(1, 1, 1, self.positions) * torch.finfo(scores.dtype).min
        weights = F.softmax(_wide(scores + bias + additive), dim=-1).type_as(scores)
        context = torch.matmul(weights, values).transpose(1, 2).reshape(x.shape[0], 1, -1)
        return F.linear(context, part.refs.sliced["o"][part.index]), bias


class SplitEncoder(torch.nn.Module):
    """The split model's embedding and encoder phases: the encoder output, chunks joined. It holds
    the whole T5 (`t5.ipu_split` is the split), so the executor's weights are the T5's."""

    def __init__(self, t5: torch.nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask):
        split = self.t5.ipu_split
        embedded = [part(input_ids, input_ids[:, :1]) for part in split.embed]
        chunks = [s(None, [e[0] for e in embedded]) for s in split.embed_sums]
        bias: List[Optional[torch.Tensor]] = [None] * split.parts
        for layer in encoder_layers(split):
            normed = [norm(c[0], [c_[1] for c_ in chunks]) for norm, c in zip(layer.norms, chunks)]
            if layer.name.endswith(".ff"):
                outs = [part(normed) for part in layer.parts]
            else:
                outs = [part(normed, attention_mask, bias[i]) for i, part in enumerate(layer.parts)]
                bias = [o[1] for o in outs]
            chunks = [s(c[0], [o[0] for o in outs]) for s, c in zip(layer.sums, chunks)]
            if len(layer.finals):
                final = [norm(c[0], [c_[1] for c_ in chunks]) for norm, c in zip(layer.finals, chunks)]
        return torch.cat(final, dim=-1)


class SplitDecoderStep(torch.nn.Module):
    """The split model's embedding, decoder and LM head phases for one position: the next token."""

    def __init__(self, t5: torch.nn.Module, batch: int, positions: int, dtype: torch.dtype):
        super().__init__()
        self.t5 = t5
        layers = [layer for layer in decoder_layers(t5.ipu_split) if layer.name.endswith(".self_attention")]
        # phase name -> index into `cached`, one module per part of that phase
        self.phase_index = {layer.name: i for i, layer in enumerate(layers)}
        self.cached = torch.nn.ModuleList([
            torch.nn.ModuleList([CachedSelfAttention(p, batch, positions, dtype) for p in layer.parts])
            for layer in layers])

    def forward(self, token_ids, position, memory, attention_mask):
        split = self.t5.ipu_split
        embedded = [part(token_ids, token_ids) for part in split.embed]
        chunks = [s(None, [e[1] for e in embedded]) for s in split.target_sums]
        bias: List[Optional[torch.Tensor]] = [None] * split.parts
        for layer in decoder_layers(split):
            normed = [norm(c[0], [c_[1] for c_ in chunks]) for norm, c in zip(layer.norms, chunks)]
            if layer.name.endswith(".ff"):
                outs = [part(normed) for part in layer.parts]
            elif layer.name.endswith(".cross_attention"):
                outs = [part(normed, attention_mask, None, [memory]) for part in layer.parts]
            else:
                cached = self.cached[self.phase_index[layer.name]]
                outs = [part(normed, position, bias[i]) for i, part in enumerate(cached)]
                bias = [o[1] for o in outs]
            chunks = [s(c[0], [o[0] for o in outs]) for s, c in zip(layer.sums, chunks)]
            if len(layer.finals):
                decoded = [norm(c[0], [c_[1] for c_ in chunks]) for norm, c in zip(layer.finals, chunks)]
        outs = [part(decoded, None) for part in split.head]
        return split.combine([o[0] for o in outs], [o[1] for o in outs], None, None)


def encoder_layers(split: SplitT5):
    return [layer for layer in split.layers if layer.name.startswith("encoder.")]


def decoder_layers(split: SplitT5):
    return [layer for layer in split.layers if layer.name.startswith("decoder.")]


def supports(split: Optional[SplitT5]) -> bool:
    """Whether this path can generate for the split: phased, and no LoRA adapter."""
    return split is not None and all(len(layer.adapter_in) == 0 and len(layer.adapter_out) == 0
                                     for layer in split.layers)


def encoder_phases(phases: Sequence[str]) -> List[str]:
    return [p for p in phases if p == "embedding" or p.startswith("encoder.")]


def decoder_phases(phases: Sequence[str]) -> List[str]:
    return [p for p in phases if p in ("embedding", "lm_head") or p.startswith("decoder.")]


class KvGenerator:
    """The two executors and the host loop, for a backend whose T5 is split in phases."""

    def __init__(self, backend, positions: int):
        poptorch, plan, t5 = backend.poptorch, backend.ipu_plan, backend.t5
        self.batch = kv_batch(backend.config.validation.per_device_eval_batch_size, plan.replicas)
        # The plan's encoder chunk for this batch (the whole batch where the plan has no estimate).
        self.encoder_batch = min(self.batch, plan.generation.encoder_batch if plan.generation is not None
                                 and plan.generation.encoder_batch else self.batch)
        self.positions = positions
        dtype = next(t5.parameters()).dtype
        self.step_module = SplitDecoderStep(t5, self.batch // plan.replicas, positions, dtype)
        phase_ipus = dict(plan.phases())
        for phase, index in self.step_module.phase_index.items():
            for j, module in enumerate(self.step_module.cached[index]):
                poptorch.BeginBlock(module, user_id=block_id(phase, j), ipu_id=phase_ipus[phase][j])

        def compile_model(module, phases):
            opts = backend._options(training=False, phases=phases)
            opts.deviceIterations(1)  # the caches hold one micro-batch
            return poptorch.inferenceModel(module, options=opts)

        self.encoder = compile_model(SplitEncoder(t5), encoder_phases(list(phase_ipus)))
        self.step = compile_model(self.step_module, decoder_phases(list(phase_ipus)))

    def executors(self) -> List:
        return [self.encoder, self.step]

    def generate(self, samples: List[Dict], max_new_tokens: int, pad_id: int, start_id: int, eos_id: int,
                 source_length: int, activate) -> List[List[int]]:
        """Greedy tokens for `samples`; `activate(executor)` gives that executor the IPUs."""
        generated: List[List[int]] = []
        for start in range(0, len(samples), self.batch):
            chunk = samples[start:start + self.batch]
            tensors = collate(padded(chunk, self.batch), pad_id, source_length=source_length)
            activate(self.encoder)
            memory = self.encode(tensors["input_ids"], tensors["attention_mask"])
            activate(self.step)
            token = torch.full((self.batch, 1), start_id, dtype=torch.int64)
            tokens = []
            finished = torch.zeros(self.batch, dtype=torch.bool)
            for position in range(max_new_tokens):
                where = torch.full((self.batch,), position, dtype=torch.int64)
                token = self.step(token, where, memory, tensors["attention_mask"]).to(torch.int64).view(self.batch, 1)
                tokens.append(token[:, 0])
                finished |= token[:, 0] == eos_id
                if bool(finished.all()):
                    break
            rows = torch.stack(tokens, dim=1).tolist()[:len(chunk)]
            generated += [trim_at_eos(row, eos_id) for row in rows]
        return generated

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder output of a batch, `encoder_batch` prompts per call (the last chunk padded)."""
        outputs = []
        for start in range(0, self.batch, self.encoder_batch):
            ids, mask = input_ids[start:start + self.encoder_batch], attention_mask[start:start + self.encoder_batch]
            rows = ids.shape[0]
            outputs.append(self.encoder(padded(ids, self.encoder_batch), padded(mask, self.encoder_batch))[:rows])
        return torch.cat(outputs, dim=0)


def padded(rows, size: int):
    """`rows` (a list or a tensor) filled up to `size` with copies of its last row: static shapes."""
    missing = size - len(rows)
    if missing <= 0:
        return rows
    if isinstance(rows, torch.Tensor):
        return torch.cat([rows, rows[-1:].expand(missing, *rows.shape[1:])], dim=0)
    return list(rows) + [rows[-1]] * missing
