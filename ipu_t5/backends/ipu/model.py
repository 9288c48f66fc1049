"""Flan-T5 arranged for poptorch, in plain torch (poptorch's functions are passed in).

- The shared embedding and the LM head become vocabulary slices, each its own parameter, so a
  slice can be its own block (a phase, when weights are streamed) and no single tensor has to be
  on chip whole. `hf_state_dict` / `load_hf_state_dict` concatenate and split them, so the
  weights, checkpoints and exports keep Hugging Face names and shapes.
- `T5ForIpuTraining` embeds source and target up front (the embedding sits with the first stage,
  so no IPU is visited twice), runs encoder, decoder and LM head, and returns the split-invariant
  token loss; `T5ForIpuGeneration` runs the same network and returns the greedy token at every
  target position, for host-driven greedy decoding with static shapes.
- `place` puts one poptorch block on each piece of an IPU plan, in execution order;
  `checkpoint_every_block` marks each T5 block's output as a recomputation checkpoint.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...compat import scales_decoder_output
from ..optim import token_loss

# Hugging Face names that hold the shared embedding (the stacks' aliases of it included).
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
LM_HEAD_KEY = "lm_head.weight"


def lookup_rows(weight: torch.Tensor, offset: int, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings of `ids` from vocabulary rows [offset, offset + len(weight)); zeros for others."""
    rows = weight.shape[0]
    local = ids - offset
    inside = ((local >= 0) & (local < rows)).unsqueeze(-1).to(weight.dtype)
    return F.embedding(local.clamp(0, rows - 1), weight) * inside


class EmbeddingSlice(torch.nn.Module):
    """Rows [offset, offset + rows) of the vocabulary; other ids contribute zeros."""

    def __init__(self, weight: torch.Tensor, offset: int, requires_grad: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        self.offset = offset

    def forward(self, source_ids, target_ids, source_sum=None, target_sum=None):
        # Both lookups in this slice's block: revisiting a slice later would revisit its IPU/phase.
        source, target = lookup_rows(self.weight, self.offset, source_ids), lookup_rows(self.weight, self.offset,
                                                                                          target_ids)
        if source_sum is None:
            return source, target
        return source_sum + source, target_sum + target


class SlicedEmbedding(torch.nn.Module):
    """The shared embedding as vocabulary slices; embeds source and target ids together."""

    def __init__(self, weight: torch.Tensor, slices: int, requires_grad: bool = True):
        super().__init__()
        # As `split_like_slices` cuts: equal slices, one row shorter where the vocabulary does not divide.
        pieces = torch.tensor_split(weight, slices)
        self.slices = torch.nn.ModuleList([EmbeddingSlice(w, sum(len(p) for p in pieces[:i]), requires_grad)
                                           for i, w in enumerate(pieces)])

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([s.weight for s in self.slices], dim=0)

    def forward(self, source_ids, target_ids):
        sums = (None, None)
        for piece in self.slices:
            sums = piece(source_ids, target_ids, *sums)
        return sums


class SlicedLMHead(torch.nn.Module):
    """The LM head as vocabulary slices; logits are their concatenation."""

    def __init__(self, weight: torch.Tensor, slices: int, requires_grad: bool = True):
        super().__init__()
        self.slices = torch.nn.ModuleList()
        for piece in torch.tensor_split(weight, slices):
            linear = torch.nn.Linear(weight.shape[1], len(piece), bias=False)
            linear.weight = torch.nn.Parameter(piece.detach().clone(), requires_grad=requires_grad)
            self.slices.append(linear)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([s.weight for s in self.slices], dim=0)

    def forward(self, hidden):
        return torch.cat([piece(hidden) for piece in self.slices], dim=-1)


def slice_vocabulary(t5: torch.nn.Module, slices: int) -> None:
    """Replace a T5's shared embedding and LM head by sliced ones (in place). The stacks are fed
    embeddings, so their aliases of the shared embedding are dropped. The slices train exactly
    when the weights they replace did (frozen under LoRA)."""
    t5.shared = SlicedEmbedding(t5.shared.weight.data, slices, t5.shared.weight.requires_grad)
    t5.lm_head = SlicedLMHead(t5.lm_head.weight.data, slices, t5.lm_head.weight.requires_grad)
    t5.encoder.embed_tokens = None
    t5.decoder.embed_tokens = None


def slice_counts(t5: torch.nn.Module) -> Dict[str, int]:
    """How many slices each split weight of `t5` has, by its Hugging Face name."""
    counts: Dict[str, int] = {}
    for name, _ in t5.named_parameters():
        parsed = parse_sliced(name)
        if parsed is not None:
            counts[parsed[0]] = counts.get(parsed[0], 0) + 1
    return counts


def hf_state_dict(t5: torch.nn.Module, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The weights of a sliced T5 under the Hugging Face `keys` it had before slicing. Joining
    copies each split matrix once (the three tied embedding names share one copy)."""
    joined = join_slices(t5.state_dict())
    return {key: joined["shared.weight"] if key in EMBEDDING_KEYS else joined[key] for key in keys}


def load_hf_state_dict(t5: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load Hugging Face-named weights into a sliced T5, cutting split weights into their slices."""
    counts = slice_counts(t5)
    own = dict(t5.named_parameters())
    rest = {}
    with torch.no_grad():
        for key in state:
            if key in EMBEDDING_KEYS[1:]:
                continue  # aliases of shared.weight
            if key in counts:
                # Read once: a lazy checkpoint view reads a tensor from disk at every lookup.
                for name, part in split_like_slices(key, state[key], counts).items():
                    own[name].copy_(part)
            else:
                rest[key] = state[key]
        t5.load_state_dict(rest, strict=False)


SLICES = ".slices."
# Split along their columns (inputs): the attention output and feed-forward output projections,
# the relative position bias (by heads) and a LoRA A matrix; all else along rows. (split_lora.py
# cuts A of o and wo, B of the other layers, and holds the other matrix whole.)
COLUMN_SPLIT_LAYERS = ("o", "wo", "relative_attention_bias")


def parse_sliced(name: str) -> Optional[Tuple[str, int]]:
    """(Hugging Face name, slice index) of a slice's name, `a.b.slices.3.weight` -> (`a.b.weight`, 3)."""
    if SLICES not in name:
        return None
    stem, rest = name.split(SLICES, 1)
    index, leaf = rest.split(".", 1)
    return "{}.{}".format(stem, leaf), int(index)


def split_dim(hf_name: str) -> int:
    """The dimension a Hugging Face weight (or its optimizer state) is cut along."""
    if ".lora_A." in hf_name:
        return 1
    if ".lora_B." in hf_name:
        return 0
    layer = [p for p in hf_name.split(".")[:-1] if p != "base_layer"][-1]
    return 1 if layer in COLUMN_SPLIT_LAYERS else 0


def split_like_slices(name: str, tensor: torch.Tensor, counts: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """A Hugging Face-named tensor (or its optimizer state) under the sliced model's names; a
    scalar (a step count) goes to every slice whole. `counts` is `slice_counts` of the model."""
    key = "shared.weight" if name in EMBEDDING_KEYS else name
    count = counts.get(key)
    if count is None:
        return {name: tensor}
    stem, leaf = key.rsplit(".", 1)
    names = ["{}.slices.{}.{}".format(stem, i, leaf) for i in range(count)]
    if not tensor.dim():
        return {n: tensor for n in names}
    return dict(zip(names, torch.tensor_split(tensor, count, dim=split_dim(key))))


def join_slices(named: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of `split_like_slices` over a whole dict: slices concatenated in order under
    their Hugging Face name (a scalar is taken from the first slice)."""
    joined: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    out = {}
    for name, tensor in named.items():
        parsed = parse_sliced(name)
        if parsed is None:
            out[name] = tensor
        else:
            joined.setdefault(parsed[0], []).append((parsed[1], tensor))
    for key, parts in joined.items():
        ordered = [t for _, t in sorted(parts, key=lambda p: p[0])]
        out[key] = torch.cat(ordered, dim=split_dim(key)) if ordered[0].dim() else ordered[0]
    return out


def forward_logits(t5: torch.nn.Module, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
    """Logits of a sliced T5: embeddings first, then encoder, decoder and LM head."""
    source, target = t5.shared(input_ids, decoder_input_ids)
    encoded = t5.encoder(inputs_embeds=source, attention_mask=attention_mask, use_cache=False)[0]
    decoded = t5.decoder(inputs_embeds=target, encoder_hidden_states=encoded,
                         encoder_attention_mask=attention_mask, use_cache=False)[0]
    if scales_decoder_output(t5.config):
        decoded = decoded * (t5.config.d_model ** -0.5)
    return t5.lm_head(decoded)


class T5ForIpuTraining(torch.nn.Module):
    """Returns the step's token loss for this micro-batch: summed cross-entropy over the global
    batch's target-token count (`num_target_tokens`, one copy per sample), so micro-batches and
    replicas add up to the global mean."""

    def __init__(self, t5: torch.nn.Module, identity_loss: Callable):
        super().__init__()
        self.t5 = t5
        self._identity_loss = identity_loss

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, num_target_tokens):
        split = getattr(self.t5, "ipu_split", None)
        if split is not None:  # every phase split over its IPUs (split.py)
            loss = split(input_ids, attention_mask, decoder_input_ids, labels, num_target_tokens)
        else:
            logits = forward_logits(self.t5, input_ids, attention_mask, decoder_input_ids)
            loss = token_loss(logits, labels, num_target_tokens[0])
        return self._identity_loss(loss, reduction="none")


class T5ForIpuGeneration(torch.nn.Module):
    """Returns the most likely next token at every decoder position."""

    def __init__(self, t5: torch.nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        split = getattr(self.t5, "ipu_split", None)
        if split is not None:
            return split(input_ids, attention_mask, decoder_input_ids)
        return torch.argmax(forward_logits(self.t5, input_ids, attention_mask, decoder_input_ids), dim=-1)


def piece_module(t5: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module that starts a piece of an IPU plan (`ipu_t5.backends.ipu.memory` names them)."""
    parts = name.split(".")
    if parts[0] in ("embedding", "lm_head"):
        whole = t5.shared if parts[0] == "embedding" else t5.lm_head
        return whole if len(parts) == 1 else whole.slices[int(parts[1])]
    stack = getattr(t5, parts[0])
    if parts[1] == "final_layer_norm":
        return stack.final_layer_norm
    block = stack.block[int(parts[1])]
    if len(parts) == 2:
        return block
    sub = {"attention": 0, "self_attention": 0, "cross_attention": 1}
    if parts[2] in sub:
        return block.layer[sub[parts[2]]]
    feed_forward = block.layer[-1]
    return feed_forward if parts[2] == "ff_in" else feed_forward.DenseReluDense.wo


def checkpoint_every_block(t5: torch.nn.Module, checkpoint: Callable) -> None:
    """Mark each T5 block's output hidden states with `checkpoint` (poptorch's
    recomputationCheckpoint), as Graphcore's T5 did with `recompute_checkpoint_every_layer`: with
    recomputation on, the backward recomputes a block from its input instead of keeping every
    activation of the stage. A forward hook, so the op sits in the block's own poptorch block."""
    def keep(module, inputs, outputs):
        if not module.training:  # generation has no backward pass to recompute for
            return None
        if torch.is_tensor(outputs):
            return checkpoint(outputs)
        return (checkpoint(outputs[0]),) + tuple(outputs[1:])

    for stack in (t5.encoder, t5.decoder):
        for block in stack.block:
            block.register_forward_hook(keep)


def place(t5: torch.nn.Module, pieces: Sequence, begin_block: Callable) -> None:
    """One `poptorch.BeginBlock` per piece (its name as user_id, its IPU as ipu_id), in
    execution order, as poptorch requires. A final layer norm riding in a piece joins that
    piece's block (poptorch treats blocks with one user_id as one)."""
    for piece in pieces:
        begin_block(piece_module(t5, piece.name), user_id=piece.name, ipu_id=piece.ipu)
        for block in piece.blocks:
            if block.endswith("final_layer_norm") and block != piece.name:
                begin_block(piece_module(t5, block), user_id=piece.name, ipu_id=piece.ipu)
