"""Flan-T5 split over the IPUs of each phase, in plain torch (poptorch places the blocks).

Every phase (`memory.split_phases` names them) is computed by `parts` IPUs at once, each on its
share of the weights:
- attention: q, k, v by heads (rows) and o by the matching input columns, so IPU i computes its
  heads' attention and a partial output `ctx_i @ o_i^T` of the whole hidden width; the relative
  position bias by heads;
- feed-forward: wi_0 and wi_1 by inner units (rows), wo by the matching input columns: a partial
  output `gelu(y wi_0_i^T) * (y wi_1_i^T) @ wo_i^T`;
- the embedding and the LM head by vocabulary slices spread over the IPUs.
The residual stream is split by columns of the hidden width: part j keeps columns chunk j in
float32 and adds chunk j of every partial output to it (the partial sums are added after the
compiler's copies, a reduce-scatter); the layer norm's weight is split the same way, its sum of
squares gathered from every chunk; the normalised chunks are gathered for the next sub-layer (an
all-gather). So no weight is used on two IPUs; LoRA adapters are cut with their layers
(split_lora.py). The loss is assembled from each vocabulary slice's log-sum-exp and target logit,
greedy tokens from each slice's best logit.

The split weights replace the Hugging Face modules' own (`q.weight` becomes `q.slices.i.weight`),
so `model.join_slices` turns names and tensors back into Hugging Face ones; the modules that
compute (`SplitT5`) hold no weights of their own. float16 runs the numerics of `fp16.py`: a
float32 residual stream, the feed-forward output computed at 1/FF_OUTPUT_SCALE and scaled back in
float32, clamping before it, and partial sums added in float32.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5Attention

from ...compat import scales_decoder_output
from ...data.batching import IGNORE_INDEX
from .fp16 import FF_OUTPUT_SCALE, FLOAT16_LIMIT
from .memory import SUBLAYERS
from .model import lookup_rows
from .sliced import Refs, Sliced, added as _added
from .split_lora import adapter_modules, lora_down, lora_up, refuse_adapted, split_linear


def _chunk(tensor: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    width = tensor.shape[-1] // parts
    return tensor.narrow(-1, index * width, width)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float16 and bfloat16 upcast to float32; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# ----- the modules that compute: one per part of a phase, each a poptorch block -----

class EmbedPart(torch.nn.Module):
    """A vocabulary slice's partial embeddings of source and target (zeros for other tokens)."""

    def __init__(self, shared: Sliced, index: int):
        super().__init__()
        self.refs, self.index = Refs(shared=shared), index

    def forward(self, source_ids, target_ids):
        weight, offset = self.refs("shared", self.index), self.refs.sliced["shared"].offsets[self.index]
        return lookup_rows(weight, offset, source_ids), lookup_rows(weight, offset, target_ids)


class StreamSum(torch.nn.Module):
    """Part j of a reduce-scatter: column chunk j of every partial output added (in float32) to
    chunk j of the residual stream, with dropout; and that chunk's sum of squares, which every
    chunk's layer norm needs."""

    def __init__(self, index: int, parts: int, dropout: float, scale: float = 1.0,
                 checkpoint: Optional[Callable] = None):
        super().__init__()
        self.index, self.parts, self.dropout, self.scale = index, parts, dropout, scale
        # poptorch's recomputationCheckpoint for a T5 block's last sum (its output), else None.
        self.checkpoint = checkpoint

    def forward(self, stream: Optional[torch.Tensor], partials: Sequence[torch.Tensor]):
        added = _added([_wide(_chunk(p, self.index, self.parts)) for p in partials])
        if self.scale != 1.0:
            added = added * self.scale
        added = F.dropout(added, self.dropout, self.training)
        chunk = added if stream is None else stream + added
        if self.checkpoint is not None and self.training:  # generation has no backward pass
            chunk = self.checkpoint(chunk)
        return chunk, chunk.pow(2).sum(-1, keepdim=True)


class NormPart(torch.nn.Module):
    """Chunk j of T5's RMS layer norm: its own columns, the sum of squares of every chunk."""

    def __init__(self, norm: Sliced, index: int, width: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.refs, self.index, self.width, self.eps, self.dropout = Refs(norm=norm), index, width, eps, dropout

    def forward(self, chunk: torch.Tensor, squares: Sequence[torch.Tensor]) -> torch.Tensor:
        weight = self.refs("norm", self.index)
        hidden = chunk * torch.rsqrt(_added(squares) / self.width + self.eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.to(weight.dtype)
        return F.dropout(weight * hidden, self.dropout, self.training)


class AttentionPart(torch.nn.Module):
    """Attention of one group of heads and its partial output; block 0's self-attention also
    computes its heads' relative position bias, which later blocks reuse."""

    def __init__(self, attention: T5Attention, index: int, parts: int):
        super().__init__()
        names = ("q", "k", "v", "o") + (("relative_attention_bias",) if attention.has_relative_attention_bias else ())
        self.refs = Refs(**{n: getattr(attention, n) for n in names})
        self.index, self.heads, self.d_kv = index, attention.n_heads // parts, attention.key_value_proj_dim
        self.is_decoder = attention.is_decoder
        self.buckets, self.distance = attention.relative_attention_num_buckets, attention.relative_attention_max_distance
        self.dropout = attention.dropout
        self.has_bias = attention.has_relative_attention_bias

    def _heads(self, x: torch.Tensor, name: str, downs: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = F.linear(x, self.refs(name, self.index))
        if name in downs:  # a LoRA adapter's share of these heads (split_lora.py)
            out = out + lora_up(self.refs.sliced[name], self.index, downs[name])
        return out.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _bias(self, length: int, device) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.long, device=device)
        relative = position[None, :] - position[:, None]
        bucket = T5Attention._relative_position_bucket(relative, bidirectional=not self.is_decoder,
                                                       num_buckets=self.buckets, max_distance=self.distance)
        return F.embedding(bucket, self.refs("relative_attention_bias", self.index)).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, normed: Sequence[torch.Tensor], mask: torch.Tensor, bias: Optional[torch.Tensor],
                memory: Optional[Sequence[torch.Tensor]] = None, downs: Optional[Dict[str, torch.Tensor]] = None):
        """(partial output, position bias, o's LoRA down-projection of these heads or None);
        `downs`: `AdapterIn`'s down-projections for adapted q, k, v."""
        downs = downs or {}
        x = torch.cat(list(normed), dim=-1)
        source = x if memory is None else torch.cat(list(memory), dim=-1)
        q, k, v = self._heads(x, "q", downs), self._heads(source, "k", downs), self._heads(source, "v", downs)
        scores = torch.matmul(q, k.transpose(3, 2))
        if self.has_bias:
            bias = self._bias(x.shape[1], x.device).to(scores.dtype)
        minimum = torch.finfo(scores.dtype).min
        if memory is not None:  # cross-attention: no position bias, the source's padding masked
            additive = (1.0 - mask[:, None, None, :].to(scores.dtype)) * minimum
        elif self.is_decoder:
            length = x.shape[1]
            additive = torch.triu(torch.full((length, length), minimum, dtype=scores.dtype, device=x.device), 1)
        else:
            additive = (1.0 - mask[:, None, None, :].to(scores.dtype)) * minimum
        position = additive if bias is None else bias + additive
        weights = F.softmax(_wide(scores + position), dim=-1).type_as(scores)
        weights = F.dropout(weights, self.dropout, self.training)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        o = self.refs.sliced["o"]
        return F.linear(context, o[self.index]), bias, lora_down(o, self.index, context, self.training)


class FeedForwardPart(torch.nn.Module):
    """The gated feed-forward for one group of inner units and its partial output."""

    def __init__(self, dense: torch.nn.Module, index: int, half: bool):
        super().__init__()
        self.refs = Refs(wi_0=dense.wi_0, wi_1=dense.wi_1, wo=dense.wo)
        self.index, self.act, self.dropout, self.half = index, dense.act, dense.dropout.p, half

    def _inner(self, x: torch.Tensor, name: str, downs: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = F.linear(x, self.refs(name, self.index))
        if name in downs:  # a LoRA adapter's share of these units (split_lora.py)
            out = out + lora_up(self.refs.sliced[name], self.index, downs[name])
        return out

    def forward(self, normed: Sequence[torch.Tensor], downs: Optional[Dict[str, torch.Tensor]] = None):
        """(partial output, wo's LoRA down-projection of these units or None); `downs`:
        `AdapterIn`'s down-projections for adapted wi_0, wi_1."""
        downs = downs or {}
        x = torch.cat(list(normed), dim=-1)
        hidden = self.act(self._inner(x, "wi_0", downs)) * self._inner(x, "wi_1", downs)
        hidden = F.dropout(hidden, self.dropout, self.training)
        wo = self.refs.sliced["wo"]
        if self.half:  # fp16.py's numerics; StreamSum scales the sum (adapter's included) back in float32
            hidden = torch.clamp(hidden, -FLOAT16_LIMIT, FLOAT16_LIMIT).to(wo[self.index].dtype) * (1.0 / FF_OUTPUT_SCALE)
        return F.linear(hidden, wo[self.index]), lora_down(wo, self.index, hidden, self.training)


class HeadPart(torch.nn.Module):
    """A vocabulary slice of the LM head: per token its log-sum-exp and the target's logit
    (training), or its best logit and token (generation)."""

    def __init__(self, lm_head: Sliced, index: int, scale: Optional[float]):
        super().__init__()
        self.refs, self.index, self.scale = Refs(lm_head=lm_head), index, scale

    def forward(self, decoded: Sequence[torch.Tensor], labels: Optional[torch.Tensor]):
        x = torch.cat(list(decoded), dim=-1)
        if self.scale is not None:
            x = x * self.scale
        weight = self.refs("lm_head", self.index)
        logits = _wide(F.linear(x, weight))
        offset = self.refs.sliced["lm_head"].offsets[self.index]
        if labels is None:
            best = logits.argmax(-1)
            return logits.gather(-1, best.unsqueeze(-1)).squeeze(-1), best + offset
        local = labels - offset
        inside = (local >= 0) & (local < weight.shape[0])
        target = logits.gather(-1, local.clamp(0, weight.shape[0] - 1).unsqueeze(-1)).squeeze(-1)
        return torch.logsumexp(logits, dim=-1), target * inside


class Combine(torch.nn.Module):
    """The loss (summed token cross-entropy over the global batch's target-token count, as
    `optim.token_loss`) or the greedy token, from every vocabulary slice's share."""

    def forward(self, firsts: Sequence[torch.Tensor], seconds: Sequence[torch.Tensor],
                labels: Optional[torch.Tensor], num_target_tokens: Optional[torch.Tensor]):
        if labels is None:
            best = torch.stack(list(firsts)).argmax(0)
            return torch.stack(list(seconds)).gather(0, best.unsqueeze(0)).squeeze(0)
        losses = torch.logsumexp(torch.stack(list(firsts)), dim=0) - _added(seconds)
        return (losses * (labels != IGNORE_INDEX)).sum() / num_target_tokens[0]


# ----- the phases -----

class SubLayer(torch.nn.Module):
    """One phase over a sub-layer: the norm of each stream chunk, each part's partial output, the
    partial sums added into each chunk; `finals`: the stack's final layer norm riding in it;
    `adapter_in`, `adapter_out`: its LoRA adapters' shared computations (split_lora.py), if any."""

    def __init__(self, name: str, norms, parts, sums, finals=(), adapters=((), ())):
        super().__init__()
        self.name = name
        self.norms, self.parts, self.sums = (torch.nn.ModuleList(m) for m in (norms, parts, sums))
        self.finals = torch.nn.ModuleList(finals)
        self.adapter_in, self.adapter_out = (torch.nn.ModuleList(m) for m in adapters)


def _norms(norm: Sliced, parts: int, width: int, eps: float, dropout: float = 0.0) -> List[NormPart]:
    return [NormPart(norm, j, width, eps, dropout) for j in range(parts)]


def _split_layer_weights(layer: torch.nn.Module, parts: int) -> None:
    """Replace a T5 sub-layer's weights by slices (in place): rows for q, k, v, wi_0, wi_1,
    columns for o, wo and the position bias, hidden columns for the layer norm; a LoRA-adapted
    linear layer with its adapter (split_lora.py)."""
    refuse_adapted(layer.layer_norm, "a layer norm")
    layer.layer_norm = Sliced(layer.layer_norm.weight, parts, 0)
    inner = getattr(layer, "SelfAttention", None) or getattr(layer, "EncDecAttention", None)
    if inner is not None:
        for name in ("q", "k", "v", "o"):
            setattr(inner, name, split_linear(getattr(inner, name), name, parts))
        if inner.has_relative_attention_bias:
            refuse_adapted(inner.relative_attention_bias, "relative_attention_bias")
            inner.relative_attention_bias = Sliced(inner.relative_attention_bias.weight, parts, 1)
    else:
        dense = layer.DenseReluDense
        for name in ("wi_0", "wi_1", "wo"):
            setattr(dense, name, split_linear(getattr(dense, name), name, parts))


class SplitT5(torch.nn.Module):
    """The computing modules of a split T5, by phase; `hidden` runs them in execution order.
    Routing only: every tensor operation happens inside a part (a poptorch block)."""

    def __init__(self, t5: torch.nn.Module, parts: int, slices: int, half: bool,
                 checkpoint: Optional[Callable] = None):
        super().__init__()
        config, d = t5.config, t5.config.d_model
        self.parts, self.slices, eps = parts, slices, config.layer_norm_epsilon
        scale = d ** -0.5 if scales_decoder_output(config) else None
        self.embed = torch.nn.ModuleList([EmbedPart(t5.shared, k) for k in range(slices)])
        self.embed_sums = torch.nn.ModuleList([StreamSum(j, parts, t5.encoder.dropout.p) for j in range(parts)])
        self.target_sums = torch.nn.ModuleList([StreamSum(j, parts, t5.decoder.dropout.p) for j in range(parts)])
        self.layers = torch.nn.ModuleList()
        for stack_name in ("encoder", "decoder"):
            stack = getattr(t5, stack_name)
            for b, block in enumerate(stack.block):
                for layer, sub in zip(block.layer, SUBLAYERS[stack_name]):
                    ff = sub == "ff"
                    if ff:
                        inner, names = layer.DenseReluDense, ("wi_0", "wi_1", "wo")
                        parts_ = [FeedForwardPart(inner, i, half) for i in range(parts)]
                    else:
                        inner = layer.SelfAttention if sub != "cross_attention" else layer.EncDecAttention
                        names = ("q", "k", "v", "o")
                        parts_ = [AttentionPart(inner, i, parts) for i in range(parts)]
                    adapters = adapter_modules({n: getattr(inner, n) for n in names})
                    dropout = layer.dropout.p
                    # A block ends with its feed-forward: each chunk of its output is a checkpoint.
                    sums = [StreamSum(j, parts, dropout, FF_OUTPUT_SCALE if ff and half else 1.0,
                                      checkpoint if ff else None) for j in range(parts)]
                    finals = _norms(stack.final_layer_norm, parts, d, eps, stack.dropout.p) \
                        if ff and b == len(stack.block) - 1 else ()
                    self.layers.append(SubLayer("{}.{}.{}".format(stack_name, b, sub),
                                                _norms(layer.layer_norm, parts, d, eps), parts_, sums, finals,
                                                adapters))
        self.head = torch.nn.ModuleList([HeadPart(t5.lm_head, k, scale) for k in range(slices)])
        self.combine = Combine()

    def phase_modules(self) -> List[Tuple[str, int, torch.nn.Module]]:
        """(phase, part, module) for every computing module, in the order `hidden` calls them."""
        per_ipu = self.slices // self.parts
        out = [("embedding", k // per_ipu, m) for k, m in enumerate(self.embed)]
        out += [("embedding", j, m) for j, m in enumerate(self.embed_sums)]
        out += [("embedding", j, m) for j, m in enumerate(self.target_sums)]
        for layer in self.layers:
            for group in (layer.norms, layer.adapter_in, layer.parts, layer.adapter_out, layer.sums, layer.finals):
                out += [(layer.name, j, m) for j, m in enumerate(group)]
        out += [("lm_head", k // per_ipu, m) for k, m in enumerate(self.head)]
        return out + [("lm_head", 0, self.combine)]

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels=None, num_target_tokens=None):
        """The loss (with `labels`) or the greedy token at every target position."""
        embedded = [part(input_ids, decoder_input_ids) for part in self.embed]
        source = [s(None, [e[0] for e in embedded]) for s in self.embed_sums]
        target = [s(None, [e[1] for e in embedded]) for s in self.target_sums]
        streams = {"encoder": source, "decoder": target}
        biases = {"encoder": [None] * self.parts, "decoder": [None] * self.parts}
        memory = None
        for layer in self.layers:
            stack = layer.name.split(".")[0]
            chunks = streams[stack]
            squares = [c[1] for c in chunks]
            normed = [norm(c[0], squares) for norm, c in zip(layer.norms, chunks)]
            cross = layer.name.endswith("cross_attention")
            downs = layer.adapter_in[0](normed, memory if cross else None) if len(layer.adapter_in) else None
            if layer.name.endswith(".ff"):
                outs = [part(normed, downs) for part in layer.parts]
            else:
                outs = [part(normed, attention_mask, None if cross else biases[stack][i], memory if cross else None,
                             downs) for i, part in enumerate(layer.parts)]
                if not cross:
                    biases[stack] = [o[1] for o in outs]
            partials = [o[0] for o in outs]
            if len(layer.adapter_out):  # the output layer's adapter: one more partial output
                partials.append(layer.adapter_out[0]([o[-1] for o in outs]))
            chunks = [s(c[0], partials) for s, c in zip(layer.sums, chunks)]
            streams[stack] = chunks
            if len(layer.finals):
                squares = [c[1] for c in chunks]
                final = [norm(c[0], squares) for norm, c in zip(layer.finals, chunks)]
                if stack == "encoder":
                    memory = final
                else:
                    decoded = final
        outs = [part(decoded, labels) for part in self.head]
        return self.combine([o[0] for o in outs], [o[1] for o in outs], labels, num_target_tokens)


def split_t5(t5: torch.nn.Module, parts: int, slices: int, half: bool,
             checkpoint: Optional[Callable] = None) -> SplitT5:
    """Split a Hugging Face T5 in place for phases of `parts` IPUs (`slices` vocabulary slices)
    and return the modules that compute it; they are attached to the T5 as `ipu_split`, so its
    train()/eval() reach them. The stacks are fed embeddings: their aliases of the shared
    embedding are dropped, as `model.slice_vocabulary` does. `checkpoint` (poptorch's
    recomputationCheckpoint, or None) marks each chunk of every T5 block's output."""
    t5.shared = Sliced(t5.shared.weight, slices, 0)
    t5.lm_head = Sliced(t5.lm_head.weight, slices, 0)
    t5.encoder.embed_tokens = None
    t5.decoder.embed_tokens = None
    for stack in (t5.encoder, t5.decoder):
        stack.final_layer_norm = Sliced(stack.final_layer_norm.weight, parts, 0)
        for block in stack.block:
            for layer in block.layer:
                _split_layer_weights(layer, parts)
    t5.ipu_split = SplitT5(t5, parts, slices, half, checkpoint)
    return t5.ipu_split


def block_id(phase: str, part: int) -> str:
    """The poptorch block (and stage) of a phase's part: one per IPU of the phase."""
    return "{}/{}".format(phase, part)


def place_split(split: SplitT5, phase_ipus: Dict[str, Sequence[int]], begin_block: Callable) -> None:
    """One `poptorch.BeginBlock` per computing module, in the order they run: the block of its
    phase's part, on that part's IPU (poptorch treats the modules of one block id as one block)."""
    for phase, part, module in split.phase_modules():
        begin_block(module, user_id=block_id(phase, part), ipu_id=phase_ipus[phase][part])
