"""`opts._Popart`: PopART session options passed through PopTorch, held to the recorded PopART
options (tests/backends/ipu/reference/popart-session-options.json: the keys PopTorch 3.3 registers
by value type, the enum values, and the batch-serialisation rules), and checked at compile time as
PopTorch and PopART check them there: an unknown key or a value of the wrong type ("Unknown uint64
option ..."), an enum value out of range, Loop batch serialisation outside the backward context in
training, zero-copy aliasing without explicit recomputation, and a batch axis smaller than the
batch-serialisation factor."""
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from . import api

REFERENCE = Path(__file__).resolve().parent.parent / "reference" / "popart-session-options.json"
POPART = json.loads(REFERENCE.read_text())
FACTOR = "batchSerializationSettings.factor"


def _value_type(value: Any) -> str:
    # PopTorch dispatches on the Python type, bool before int (python/options.py).
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "uint64"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "set / vector"


class PopartOptions(api._recorded_class("poptorch.options._PopartOptions")):
    """The real `_PopartOptions`: `set` stores the value; PopART reads the options at compile."""

    def __init__(self):
        super().__init__()
        self.settings: Dict[str, Any] = {}

    def set(self, key, value):
        api.bind("poptorch.options._PopartOptions.set", (key, value), {})
        self.settings[key] = value
        return self

    def factor(self) -> int:
        return int(self.settings.get(FACTOR, 0))

    def check(self, training: bool, micro: List[torch.Tensor]) -> None:
        """What compiling would refuse, for a graph fed `micro` (one micro-batch's inputs)."""
        options, enums = POPART["options"], POPART["enums"]
        for key, value in self.settings.items():
            kind = _value_type(value)
            if key not in options.get(kind, ()):
                raise api.Error(POPART["errors"]["unknown"].format(type=kind, key=key))
            enum = options["enum"].get(key)
            if enum is not None and value >= len(enums[enum]):
                raise api.Error(POPART["errors"]["enum_range"].format(enum=enum))
        method = self.settings.get("batchSerializationSettings.method", 0)
        context = self.settings.get("batchSerializationSettings.transformContext", 0)
        if training and self.factor() > 1 and method == enums["BatchSerializationMethod"]["Loop"] \
                and context != enums["BatchSerializationTransformContext"]["Bwd"]:
            raise api.Error("Loop batch serialisation of a training graph needs transformContext Bwd")
        if self.settings.get("aliasZeroCopy") and not self.settings.get("explicitRecomputation"):
            raise api.Error("aliasZeroCopy requires explicitRecomputation")
        for index, tensor in enumerate(micro):
            if self.factor() > 1 and tensor.shape[0] < self.factor():
                raise api.Error(POPART["errors"]["batch_axis"].format(
                    axis=tensor.shape[0], factor=self.factor(), tensor="input{}".format(index)))

    def slices(self, micro: List[torch.Tensor]) -> List[List[torch.Tensor]]:
        """One micro-batch's inputs as the batch-serialised graph runs them: `factor` slices of dim 0."""
        factor = max(self.factor(), 1)
        batch = micro[0].shape[0]
        if batch % factor:
            # PopART accepts it; the stand-in does not model uneven slices.
            raise api.Error("stand-in: a batch of {} in {} uneven slices is not modelled".format(batch, factor))
        size = batch // factor
        return [[t[i * size:(i + 1) * size] for t in micro] for i in range(factor)]


api.SUB_CLASSES["poptorch.options._PopartOptions"] = PopartOptions
