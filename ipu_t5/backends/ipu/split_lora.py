"""LoRA adapters under the split (split.py): every peft `lora.Linear` is cut with its layer.

peft computes `base(x) + scaling * B @ A @ dropout(x)`. Under the split:
- a layer cut by output units (q, k, v, wi_0, wi_1; its input is the whole hidden width) has B cut
  by rows with it, and A whole: `AdapterIn` computes `A @ dropout(x)` once per sub-layer (r numbers
  per token) in the phase's part 0, and part i adds `scaling * B_i @ that` to its output units;
- a layer cut by input columns (o, wo; part i holds its inputs i) has A cut by columns with it, and
  B whole: part i computes `A_i @ dropout(x_i)`, and `AdapterOut` (part 0) adds those up and
  returns `scaling * B @ sum`, one more partial output that the stream's chunks add as they add
  the base layer's.
So, as for the base weights, no adapter matrix is read on two IPUs, and the sum is peft's (summation
order aside). The dropout is peft's `lora_dropout`, drawn on each part's share of the input.

The adapted layer keeps peft's structure, so slices join under peft's names:
`q.base_layer.slices.i.weight` -> `q.base_layer.weight`, `q.lora_B.default.slices.i.weight` ->
`q.lora_B.default.weight` (rows), `o.lora_A.default.slices.i.weight` -> `o.lora_A.default.weight`
(columns: `model.split_dim`); a matrix held whole keeps its own name.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...lora import ADAPTER_NAME
from .sliced import Refs, Sliced, WeightSlice, added

# The layers T5's split cuts by input columns; every other linear layer it cuts by output rows.
COLUMN_LAYERS = ("o", "wo")
# Attention projections that read the source (the encoder's output, in cross-attention).
SOURCE_LAYERS = ("k", "v")


def is_adapted(module: torch.nn.Module) -> bool:
    """Whether `module` is a peft LoRA layer wrapping a base layer."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


class SplitAdapter(torch.nn.Module):
    """A peft `lora.Linear` cut for `parts` IPUs: indexing gives the base weight's slices (as
    `Sliced` does), `down` and `up` the adapter's A and B for a part."""

    def __init__(self, layer: torch.nn.Module, name: str, parts: int):
        super().__init__()
        dora = getattr(layer, "use_dora", None)
        if set(layer.lora_A.keys()) != {ADAPTER_NAME} or (isinstance(dora, dict) and any(dora.values())):
            raise UserError("the IPU backend's split cuts one plain LoRA adapter per layer ({!r}); {} has {}: train "
                            "one adapter without DoRA, or use --backend torch or single.".format(
                                ADAPTER_NAME, name, sorted(layer.lora_A.keys())))
        self.columns = name in COLUMN_LAYERS
        self.base_layer = Sliced(layer.base_layer.weight, parts, 1 if self.columns else 0)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        self.lora_A = torch.nn.ModuleDict({ADAPTER_NAME: Sliced(a, parts, 1) if self.columns
                                           else WeightSlice(a, a.requires_grad)})
        self.lora_B = torch.nn.ModuleDict({ADAPTER_NAME: WeightSlice(b, b.requires_grad) if self.columns
                                           else Sliced(b, parts, 0)})
        self.scaling = float(layer.scaling[ADAPTER_NAME])
        self.dropout = float(getattr(layer.lora_dropout[ADAPTER_NAME], "p", 0.0))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.base_layer[index]

    def down(self, index: Optional[int] = None) -> torch.Tensor:
        """A: part `index`'s columns for a column-cut layer, else whole."""
        a = self.lora_A[ADAPTER_NAME]
        return a[index] if self.columns else a.weight

    def up(self, index: Optional[int] = None) -> torch.Tensor:
        """B: part `index`'s rows for a row-cut layer, else whole."""
        b = self.lora_B[ADAPTER_NAME]
        return b.weight if self.columns else b[index]


def split_linear(layer: torch.nn.Module, name: str, parts: int) -> torch.nn.Module:
    """A T5 linear layer (plain or LoRA-adapted) cut for `parts` IPUs as split.py cuts `name`."""
    if is_adapted(layer):
        return SplitAdapter(layer, name, parts)
    return Sliced(layer.weight, parts, 1 if name in COLUMN_LAYERS else 0)


def refuse_adapted(module: torch.nn.Module, what: str) -> None:
    """A one-line refusal for an adapter on a weight the split does not cut as a linear layer."""
    if is_adapted(module):
        raise UserError("peft.target_modules adapts {}, which the IPU backend's split carries no LoRA adapter for: "
                        "adapt q, k, v, o, wi_0, wi_1 or wo, or use --backend torch or single.".format(what))


def lora_up(adapter: torch.nn.Module, index: int, down: torch.Tensor) -> torch.Tensor:
    """Part `index`'s output units of a row-cut layer's adapter, from the shared down-projection."""
    return F.linear(down, adapter.up(index)) * adapter.scaling


def lora_down(adapter: torch.nn.Module, index: int, x: torch.Tensor, training: bool) -> Optional[torch.Tensor]:
    """A column-cut layer's down-projection of part `index`'s inputs (None when not adapted)."""
    if not isinstance(adapter, SplitAdapter):
        return None
    return F.linear(F.dropout(x, adapter.dropout, training), adapter.down(index))


class AdapterIn(torch.nn.Module):
    """The down-projections `A @ dropout(x)` of a sub-layer's row-cut adapted layers, by name:
    computed once, in its phase's part 0, and read by every part."""

    def __init__(self, adapters: Dict[str, SplitAdapter]):
        super().__init__()
        self.refs, self.names = Refs(**adapters), sorted(adapters)

    def forward(self, normed: Sequence[torch.Tensor], memory: Optional[Sequence[torch.Tensor]] = None):
        x = torch.cat(list(normed), dim=-1)
        source = x if memory is None else torch.cat(list(memory), dim=-1)
        downs = {}
        for name in self.names:
            adapter = self.refs.sliced[name]
            inputs = source if name in SOURCE_LAYERS else x
            downs[name] = F.linear(F.dropout(inputs, adapter.dropout, self.training), adapter.down())
        return downs


class AdapterOut(torch.nn.Module):
    """A column-cut layer's adapter output: its parts' down-projections added, then B, whole, in
    its phase's part 0: one more partial output of the sub-layer."""

    def __init__(self, adapter: SplitAdapter):
        super().__init__()
        self.refs = Refs(layer=adapter)

    def forward(self, downs: Sequence[torch.Tensor]) -> torch.Tensor:
        adapter = self.refs.sliced["layer"]
        return F.linear(added(list(downs)), adapter.up()) * adapter.scaling


def adapter_modules(layers: Dict[str, torch.nn.Module]) -> Tuple[List[AdapterIn], List[AdapterOut]]:
    """The adapter modules of one sub-layer (its linear layers by name): an `AdapterIn` if any
    row-cut layer is adapted, an `AdapterOut` if its column-cut layer is (none without LoRA)."""
    adapted = {n: m for n, m in layers.items() if isinstance(m, SplitAdapter)}
    rows = {n: m for n, m in adapted.items() if not m.columns}
    columns = [m for m in adapted.values() if m.columns]
    return ([AdapterIn(rows)] if rows else []), [AdapterOut(m) for m in columns]
