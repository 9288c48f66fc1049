"""The stand-in's hold on the real poptorch 3.3 API: the recorded reference, signatures every call
is bound against, the record of calls, enums and the option objects (see the package's docstring)."""
import enum
import functools
import inspect
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

# A copy of shared/reference/poptorch-3.3-api.json (recorded from graphcore/poptorch's sources), kept
# in the tests so a fresh clone can check the stand-in; test_ipu_backend compares it with shared/.
REFERENCE = Path(__file__).resolve().parent.parent / "reference" / "poptorch-3.3-api.json"


API: Dict[str, Dict[str, Any]] = json.loads(REFERENCE.read_text())["api"]


class Error(Exception):
    """What the stand-in raises where the real poptorch or PopART would refuse (poptorch.Error)."""


def signature(qualname: str) -> inspect.Signature:
    """The recorded parameters of a real poptorch callable (without `self`)."""
    if qualname not in API:
        raise AttributeError("{} is not in the real poptorch 3.3 API".format(qualname))
    params = []
    for p in API[qualname].get("params") or []:
        kind = getattr(inspect.Parameter, p["kind"])
        has_default = p["default"] is not None and kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                inspect.Parameter.VAR_KEYWORD)
        params.append(inspect.Parameter(p["name"], kind, default=p["default"] if has_default else inspect.Parameter.empty))
    return inspect.Signature(params)


class Record:
    """What the code under test did with poptorch."""

    def __init__(self, ipus: int):
        self.ipus = ipus
        self.calls: List[tuple] = []
        self.placements: List[tuple] = []
        self.executors: List["PoplarExecutor"] = []
        self.attached: Dict[int, int] = {}
        self.tracing = False
        self.trace: List[tuple] = []
        # (block, shape) of every tensor given to recomputationCheckpoint while an executor traced.
        self.checkpoints: List[tuple] = []

    def named(self, qualname: str) -> List[Dict[str, Any]]:
        """Bound arguments of every call to `qualname`, in order."""
        return [args for name, args in self.calls if name == qualname]


RECORD = Record(0)


def bind(qualname: str, args, kwargs) -> Dict[str, Any]:
    try:
        bound = signature(qualname).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError("{}{}: the real poptorch would reject this call: {}".format(
            qualname, signature(qualname), err)) from None
    RECORD.calls.append((qualname, dict(bound.arguments)))
    return dict(bound.arguments)


def checked(qualname: str, method: bool = True):
    """Bind every call of the decorated callable against the real API's record, and record it."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bind(qualname, args[1:] if method else args, kwargs)
            return fn(*args, **kwargs)
        inner.real_api_name = qualname
        return inner
    return wrap


def _enum(name: str):
    entry = API["poptorch." + name]
    members = {k: json.loads(v) if not v.startswith("'") else v.strip("'") for k, v in entry["members"].items()}
    base = enum.IntEnum if "enum.IntEnum" in entry["bases"] else enum.Enum
    return base(name, members)


OutputMode = _enum("OutputMode")
ReductionType = _enum("ReductionType")
Liveness = _enum("Liveness")
AutoStage = _enum("AutoStage")

# Type checks the real setters assert, by method.
SETTER_CHECKS = {
    "poptorch.Options.outputMode": lambda a: isinstance(a["output_mode"], OutputMode),
    "poptorch.Options.randomSeed": lambda a: isinstance(a["random_seed"], int),
    "poptorch.Options.replicationFactor": lambda a: isinstance(a["replication_factor"], int),
    "poptorch.Options.deviceIterations": lambda a: isinstance(a["device_iterations"], int),
    "poptorch.Options.autoRoundNumIPUs": lambda a: isinstance(a["auto_round_num_ipus"], bool),
    "poptorch.Options.setAvailableMemoryProportion": lambda a: all(
        k.startswith("IPU") for k in a["available_memory_proportion"]),
    "poptorch.Options.setExecutionStrategy": lambda a: isinstance(a["strategy"], _Strategy),
    "poptorch.Options.enableExecutableCaching": lambda a: isinstance(a["path"], str),
    "poptorch.options._TrainingOptions.gradientAccumulation": lambda a: isinstance(a["gradient_accumulation"], int),
    "poptorch.options._TrainingOptions.accumulationAndReplicationReductionType":
        lambda a: isinstance(a["reduction_type"], ReductionType),
    "poptorch.options._TrainingOptions.setAutomaticLossScaling": lambda a: isinstance(a["enabled"], bool),
    "poptorch.options._PrecisionOptions.enableStochasticRounding": lambda a: isinstance(a["enabled"], bool),
    "poptorch.options._PrecisionOptions.setPartialsType": lambda a: a["dtype"] in (torch.float16, torch.float32),
    "poptorch.options._TensorLocationOptions.setWeightLocation":
        lambda a: isinstance(a["location"], TensorLocationSettings),
    "poptorch.options._TensorLocationOptions.setOptimizerLocation":
        lambda a: isinstance(a["location"], TensorLocationSettings),
    "poptorch.options._TensorLocationOptions.setAccumulatorLocation":
        lambda a: isinstance(a["location"], TensorLocationSettings),
    "poptorch.options._TensorLocationOptions.setActivationLocation":
        lambda a: isinstance(a["location"], TensorLocationSettings),
    "poptorch.TensorLocationSettings.useOnChipStorage": lambda a: isinstance(a.get("use", True), bool),
    "poptorch.TensorLocationSettings.useReplicatedTensorSharding": lambda a: isinstance(a.get("use", True), bool),
}


class _Recorded:
    """An options object whose methods and properties come from the real API's record."""

    _qualname = ""

    def __init__(self):
        self.values: Dict[str, Dict[str, Any]] = {}
        self._subs: Dict[str, "_Recorded"] = {}

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        key = "{}.{}".format(self._qualname, name)
        entry = API.get(key)
        if entry is None:
            raise AttributeError("{} has no attribute {!r} in the real poptorch 3.3 API".format(self._qualname, name))
        if entry["kind"] == "property":
            if name not in self._subs:
                sub = API[self._qualname]["sub_objects"][name]["class"]
                self._subs[name] = SUB_CLASSES.get(sub, _recorded_class(sub))()
            return self._subs[name]

        def method(*args, **kwargs):
            arguments = bind(key, args, kwargs)
            check = SETTER_CHECKS.get(key)
            if check is not None and not check(arguments):
                raise AssertionError("{}: the real poptorch asserts on {!r}".format(key, arguments))
            self.values[name] = arguments
            return self if entry.get("returns_self") else None
        return method

    def value(self, method: str, argument: str, default=None):
        return self.values.get(method, {}).get(argument, default)


# Option objects with behaviour of their own (popart.py registers `_Popart`'s), by real class name.
SUB_CLASSES: Dict[str, type] = {}


def _recorded_class(qualname: str):
    return type(qualname.rsplit(".", 1)[-1], (_Recorded,), {"_qualname": qualname})


class Options(_recorded_class("poptorch.Options")):
    @checked("poptorch.Options")
    def __init__(self):
        super().__init__()


class TensorLocationSettings(_recorded_class("poptorch.TensorLocationSettings")):
    @checked("poptorch.TensorLocationSettings")
    def __init__(self, **default_values):
        super().__init__()


class _Strategy:
    phased = False

    def __init__(self):
        # block id -> (stage or phase index, Stage)
        self.block_map: Dict[str, tuple] = {}

    def _add(self, index: int, stage: "Stage"):  # a strategies.Stage
        for block in stage.block_ids:
            assert block not in self.block_map, "{} associated with more than one stage".format(block)
            self.block_map[block] = (index, stage)
