"""A STAND-IN for poptorch, the Poplar SDK's PyTorch-for-IPU package, which cannot be installed here.

This is not poptorch and runs nothing on an IPU. It lets the tests drive the IPU backend on any
machine, and it is held to the real API so that it cannot accept what poptorch would refuse:

- Every function, class, method, property and enum member it offers is looked up in the record of
  the real poptorch 3.3 API (`shared/reference/poptorch-3.3-api.json`, read from graphcore/poptorch),
  and every call is bound against the recorded parameters: a name the real poptorch lacks, or
  arguments it would not bind, raise. The option setters also make the type checks the real ones
  assert (an `OutputMode` for `outputMode`, "IPUn" keys for `setAvailableMemoryProportion`, ...).
- It records the calls (`Record`: every call with its bound arguments, BeginBlock placements,
  executors) for tests to assert.
- At compile time (the first call of an executor) it enforces poptorch's and PopART's rules: blocks
  known to an explicit strategy, each in exactly one stage, pipeline stages and phases in
  ascending order, IPUs used a power of two unless `autoRoundNumIPUs`, training gradient
  accumulation >= 2 x stages - 1, inference device iterations >= stages, a host batch divisible
  into micro-batches, free IPUs to attach to; and the documented phase rules: the stages of a
  phase on distinct IPUs within the replica, serial phases all on one group of IPUs, parallel
  phases alternating between the even and the odd IPUs.
- It executes on the CPU with poptorch's semantics: weights and optimizer state live "on the device"
  (the host copies go stale until `copyWeightsToHost` or a detach), `trainingModel` runs forward,
  backward and one optimizer step per device iteration over micro-batch x replicas x gradient
  accumulation samples, with the reduction, loss scaling, clipping and output mode set in the
  options, and learning-rate changes reach the device only through `setOptimizer`. Dropout draws
  from the device's own generator (seeded by `Options.randomSeed` at compile time, read and set
  through `rng_state`), not from the host's.
"""
import enum
import functools
import importlib.machinery
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

# A copy of shared/reference/poptorch-3.3-api.json (recorded from graphcore/poptorch's sources), kept
# in the tests so a fresh clone can check the stand-in; test_ipu_backend compares it with shared/.
REFERENCE = Path(__file__).resolve().parent / "reference" / "poptorch-3.3-api.json"


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
                self._subs[name] = _recorded_class(sub)()
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


class Stage:
    @checked("poptorch.Stage")
    def __init__(self, *block_ids):
        assert all(isinstance(b, str) for b in block_ids), "Block IDs are supposed to be strings"
        self.block_ids = block_ids
        self.ipu_id: Optional[int] = None

    @property
    def blocks(self):
        return list(self.block_ids)

    @checked("poptorch.Stage.ipu")
    def ipu(self, ipu):
        assert isinstance(ipu, int)
        self.ipu_id = ipu
        return self


class Phase:
    @checked("poptorch.Phase")
    def __init__(self, *arg):
        if all(isinstance(a, Stage) for a in arg):
            self.stages = list(arg)
        else:
            assert all(isinstance(a, str) for a in arg), "All arguments must either be block IDs or Stages"
            self.stages = [Stage(*arg)]

    @checked("poptorch.Phase.stage")
    def stage(self, idx):
        return self.stages[idx]

    @checked("poptorch.Phase.ipus")
    def ipus(self, *ipus):
        assert len(ipus) == len(self.stages), "Phase contains {} stages but you provided {} ipus".format(
            len(self.stages), len(ipus))
        for stage, ipu in zip(self.stages, ipus):
            stage.ipu(ipu)


class _Strategy:
    phased = False

    def __init__(self):
        # block id -> (stage or phase index, Stage)
        self.block_map: Dict[str, tuple] = {}

    def _add(self, index: int, stage: Stage):
        for block in stage.block_ids:
            assert block not in self.block_map, "{} associated with more than one stage".format(block)
            self.block_map[block] = (index, stage)


class PipelinedExecution(_Strategy):
    @checked("poptorch.PipelinedExecution")
    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], AutoStage):
            return
        for index, arg in enumerate(args):
            stage = arg if isinstance(arg, Stage) else Stage(arg) if isinstance(arg, str) else Stage(*arg)
            self._add(index, stage)


class ShardedExecution(PipelinedExecution):
    pass


class _Phased(_Strategy):
    phased = True

    def _check_phases(self, ipus_per_replica: int):
        """poptorch's phase rules: every stage of a phase on its own IPU within the replica, and the
        strategy's own rule for the groups of IPUs the phases use."""
        ipus_of_phases = []
        for index, phase in enumerate(self.phases):
            ipus = [stage.ipu_id for stage in phase.stages]
            if None in ipus:
                raise Error("phase {} has a stage with no IPU: give every stage of a phase one".format(index))
            outside = sorted(i for i in ipus if not 0 <= i < ipus_per_replica)
            if outside:
                raise Error("phase {} has stages on IPU(s) {}, outside the {} IPUs of a replica".format(
                    index, outside, ipus_per_replica))
            if len(set(ipus)) != len(ipus):
                raise Error("phase {} has two stages on one IPU ({}): the stages of a phase run at the same time on "
                            "different IPUs".format(index, ipus))
            ipus_of_phases.append(ipus)
        self._check_groups(ipus_of_phases)

    def __init__(self, *phases):
        super().__init__()
        assert phases, "There is currently no AutoStage for PhasedExecution, please explicitly specify the phases"
        self.phases = []
        for index, arg in enumerate(phases):
            phase = arg if isinstance(arg, Phase) else Phase(*(arg if isinstance(arg, list) else [arg]))
            self.phases.append(phase)
            for stage in phase.stages:
                self._add(index, stage)
        self.liveness = Liveness.AlwaysLive


class SerialPhasedExecution(_Phased):
    """ "All the phases run serially on a single group of IPUs" (poptorch's docstring)."""

    @checked("poptorch.SerialPhasedExecution")
    def __init__(self, *phases):
        super().__init__(*phases)

    @checked("poptorch.SerialPhasedExecution.setTensorsLiveness")
    def setTensorsLiveness(self, liveness):
        assert isinstance(liveness, Liveness)
        self.liveness = liveness
        return self

    @checked("poptorch.SerialPhasedExecution.phase")
    def phase(self, phase):
        return self.phases[phase]

    def _check_groups(self, ipus_of_phases):
        groups = {frozenset(ipus) for ipus in ipus_of_phases}
        if len(groups) > 1:
            raise Error("SerialPhasedExecution runs all the phases on a single group of IPUs, but the phases use {}"
                        .format(sorted(sorted(g) for g in groups)))


class ParallelPhasedExecution(_Phased):
    """Phases alternate between two groups of IPUs: "Even phases must run on even IPUs and odd
    phases on odd IPUs" (poptorch's user guide)."""

    @checked("poptorch.ParallelPhasedExecution")
    def __init__(self, *phases):
        super().__init__(*phases)

    @checked("poptorch.ParallelPhasedExecution.phase")
    def phase(self, phase):
        return self.phases[phase]

    @checked("poptorch.ParallelPhasedExecution.sendTensorsOffChipAfterFwd")
    def sendTensorsOffChipAfterFwd(self, off_chip=True):
        assert isinstance(off_chip, bool)
        self.liveness = Liveness.OffChipAfterFwd if off_chip else Liveness.AlwaysLive
        return self

    def _check_groups(self, ipus_of_phases):
        for index, ipus in enumerate(ipus_of_phases):
            wrong = sorted(i for i in ipus if i % 2 != index % 2)
            if wrong:
                raise Error("ParallelPhasedExecution: phase {} is {} and must run on {} IPUs, but uses IPU(s) {}".format(
                    index, "even" if index % 2 == 0 else "odd", "even" if index % 2 == 0 else "odd", wrong))


class _BlockHook:
    def __init__(self, user_id, ipu_id):
        self.user_id, self.ipu_id = user_id, ipu_id

    def __call__(self, module, inputs):
        if RECORD.tracing:
            RECORD.trace.append((self.user_id, self.ipu_id))


@checked("poptorch.BeginBlock", method=False)
def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
    if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
        raise Error("module has already been assigned to a block.")
    layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
    RECORD.placements.append((layer_to_call, user_id, ipu_id))
    return layer_to_call


@checked("poptorch.identity_loss", method=False)
def identity_loss(x, reduction):
    assert reduction in ("sum", "mean", "none"), "reduction must be sum, mean or none"
    return {"sum": torch.sum, "mean": torch.mean, "none": lambda t: t}[reduction](x)


@checked("poptorch.ipuHardwareIsAvailable", method=False)
def ipuHardwareIsAvailable(num_ipus=1):
    return RECORD.ipus >= num_ipus and RECORD.ipus > 0


class AdamW(torch.optim.AdamW):
    """poptorch.optim.AdamW: a torch AdamW whose state lives on the device once compiled."""

    @checked("poptorch.optim.AdamW")
    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, maximize=None,
                 foreach=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                 bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None, max_grad_norm=None):
        torch_args = {k: v for k, v in dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay).items()
                      if v is not None}
        super().__init__(params, **torch_args)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.max_grad_norm = max_grad_norm
        self.accum_type = accum_type
        self.executor: Optional["PoplarExecutor"] = None
        self.pending_ipu_state: Optional[Dict[str, torch.Tensor]] = None

    @checked("poptorch.optim.AdamW.state_dict")
    def state_dict(self):
        torch_part = torch.optim.Optimizer.state_dict(self)
        executor = self.executor
        if self.pending_ipu_state is not None:
            return {**torch_part, "ipu_state": dict(self.pending_ipu_state), "ipu_param": {}}
        if executor is None or not executor.isCompiled():
            return {**torch_part, "ipu_state": None, "ipu_param": None}
        return {**torch_part, "ipu_state": executor._read_optimizer_state(),
                "ipu_param": {"lossScaling_FLOAT": torch.tensor(self.loss_scaling)}}

    @checked("poptorch.optim.AdamW.load_state_dict")
    def load_state_dict(self, state):
        torch.optim.Optimizer.load_state_dict(self, state)
        if not ("ipu_state" in state and "ipu_param" in state):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        if state["ipu_state"] is not None and state["ipu_param"] is not None:
            self.pending_ipu_state = dict(state["ipu_state"])
            if self.executor is not None and self.executor.isAttachedToDevice():
                self.executor._write_optimizer_state()


# PopART's optimizer-state tensor names: prefix + the weight's name (popart/names.hpp).
STATE_PREFIXES = (("Accl1___", "exp_avg"), ("Accl2___", "exp_avg_sq"), ("Step___", "step"))


class PoplarExecutor:
    """What trainingModel / inferenceModel return."""

    def __init__(self, model, options, training, optimizer=None):
        self._user_model = model
        self._options = options or Options()
        self.training = training
        self.optimizer = optimizer
        self.compiled = False
        self.attached = False
        self.device_weights: Dict[str, torch.Tensor] = {}
        self.device_optimizer: Optional[torch.optim.AdamW] = None
        self.hyper = None
        self.trace: List[tuple] = []
        self.device_rng: Optional[torch.Tensor] = None
        self.num_ipus = 0
        self.stages = 1
        if optimizer is not None:
            optimizer.executor = self
            self.hyper = self._hyperparameters(optimizer)
        RECORD.executors.append(self)

    @property
    @checked("poptorch.PoplarExecutor.options")
    def options(self):
        return self._options

    @property
    @checked("poptorch.PoplarExecutor.model")
    def model(self):
        return self._user_model

    # -- option values --
    def _opt(self, method, argument, default):
        return self._options.value(method, argument, default)

    @property
    def _replicas(self) -> int:
        return self._opt("replicationFactor", "replication_factor", 1)

    @property
    def _device_iterations(self) -> int:
        return self._opt("deviceIterations", "device_iterations", 1)

    @property
    def _accumulation(self) -> int:
        return self._options.Training.value("gradientAccumulation", "gradient_accumulation", 1)

    @property
    def _strategy(self):
        return self._opt("setExecutionStrategy", "strategy", None) or PipelinedExecution()

    @staticmethod
    def _hyperparameters(optimizer):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"groups": groups, "loss_scaling": optimizer.loss_scaling, "max_grad_norm": optimizer.max_grad_norm}

    # -- compile-time rules --
    def _compile(self, args):
        if RECORD.ipus == 0:
            raise Error("No IPU detected in the system.")
        micro = self._split(args)[0]
        RECORD.trace, RECORD.tracing = [], True
        try:
            with torch.no_grad():
                self._user_model(*micro)
        finally:
            RECORD.tracing = False
        self.trace = list(RECORD.trace)
        self._check_placement()
        self.compiled = True
        generator = torch.Generator()
        generator.manual_seed(self._opt("randomSeed", "random_seed", 0))
        self.device_rng = generator.get_state()
        if self.training:
            names = dict(self._user_model.named_parameters())
            self.device_optimizer = torch.optim.AdamW([{"params": [p for p in g["params"]], **h} for g, h in zip(
                self.optimizer.param_groups, self.hyper["groups"])])
            self.names = {id(p): n for n, p in names.items()}
        self.attachToDevice()

    def _check_placement(self):
        strategy = self._strategy
        if not self.trace:
            raise Error("No active Block, all the ops must belong to a Block")
        positions, ipus = [], []
        for user_id, ipu_id in self.trace:
            if strategy.block_map:
                if user_id not in strategy.block_map:
                    raise Error("Unknown Block '{}' list of expected Blocks: {}".format(user_id, list(strategy.block_map)))
                index, stage = strategy.block_map[user_id]
                ipu = stage.ipu_id if stage.ipu_id is not None else ipu_id
                positions.append(index)
            else:
                if ipu_id is None:
                    raise Error("poptorch.AutoStage.SameAsIpu was selected but no IPU was specified for block {}"
                                .format(user_id))
                ipu = ipu_id
                positions.append(ipu_id)
            ipus.append(ipu)
        if strategy.phased:
            strategy._check_phases(RECORD.ipus // self._replicas)
        if any(later < earlier for earlier, later in zip(positions, positions[1:])):
            raise Error("{} ids must be ascending in execution order; got {}".format(
                "phase" if strategy.phased else "stage", positions))
        used = max(len(set(ipus)), max(ipus) + 1)
        self.num_ipus = used * self._replicas
        if self.num_ipus & (self.num_ipus - 1) and not self._opt("autoRoundNumIPUs", "auto_round_num_ipus", False):
            raise Error("{} IPUs requested: the number of IPUs must be a power of 2 (see "
                        "poptorch.Options.autoRoundNumIPUs)".format(self.num_ipus))
        if self.num_ipus & (self.num_ipus - 1):
            self.num_ipus = 1 << (self.num_ipus - 1).bit_length()
        switches = sum(1 for a, b in zip(ipus, ipus[1:]) if a != b)
        self.stages = switches + 1
        if not strategy.phased:
            if self.training and self.stages > 1 and self._accumulation < 2 * self.stages - 1:
                raise Error("For pipelining, depth (gradient accumulation factor) must equal at least the number "
                            "of pipeline stages ({})".format(2 * self.stages - 1))
            if not self.training and self.stages > 1 and self._device_iterations < self.stages:
                raise Error("inference with PipelinedExecution needs deviceIterations >= {} stages".format(self.stages))
        if not self.training and self._accumulation != 1:
            raise Error("When running an inferenceModel, you must set gradientAccumulation to 1")

    def _split(self, args):
        parts = self._device_iterations * self._replicas * (self._accumulation if self.training else 1)
        batch = args[0].shape[0]
        if batch % parts:
            raise Error("the host batch of {} does not split into {} micro-batches (device iterations x replicas x "
                        "gradient accumulation)".format(batch, parts))
        micro = batch // parts
        return [[a[i * micro:(i + 1) * micro] for a in args] for i in range(parts)]

    # -- the device --
    def _params(self):
        return dict(self._user_model.named_parameters())

    @checked("poptorch.PoplarExecutor.attachToDevice")
    def attachToDevice(self):
        self._require_compiled()
        if self.attached:
            raise Error("Device is already attached")
        if sum(RECORD.attached.values()) + self.num_ipus > RECORD.ipus:
            raise Error("Failed to acquire {} IPUs: {} of {} are attached to another executable".format(
                self.num_ipus, sum(RECORD.attached.values()), RECORD.ipus))
        RECORD.attached[id(self)] = self.num_ipus
        self.attached = True
        self.device_weights = {n: p.detach().clone() for n, p in self._params().items()}
        if self.training:
            self._write_optimizer_state()

    @checked("poptorch.PoplarExecutor.detachFromDevice")
    def detachFromDevice(self):
        self._require_compiled()
        if not self.attached:
            raise Error("Device is not attached")
        if self.training:
            self.copyWeightsToHost()
        RECORD.attached.pop(id(self), None)
        self.attached = False

    @checked("poptorch.PoplarExecutor.isAttachedToDevice")
    def isAttachedToDevice(self):
        return self.attached

    @checked("poptorch.PoplarExecutor.isCompiled")
    def isCompiled(self):
        return self.compiled

    def _require_compiled(self):
        if not self.compiled:
            raise Error("Model has not been compiled or has been destroyed.")

    @checked("poptorch.PoplarExecutor.compile")
    def compile(self, *args, **kwargs):
        if self.compiled:
            raise Error("Model has already been compiled.")
        self._compile(list(args) + list(kwargs.values()))

    @property
    @checked("poptorch.PoplarExecutor.rng_state")
    def rng_state(self) -> List[int]:
        self._require_compiled()
        return self.device_rng.tolist()

    @rng_state.setter
    def rng_state(self, state: List[int]) -> None:
        self._require_compiled()
        self.device_rng = torch.tensor(state, dtype=torch.uint8)

    @checked("poptorch.PoplarExecutor.copyWeightsToHost")
    def copyWeightsToHost(self):
        self._require_compiled()
        with torch.no_grad():
            for name, param in self._params().items():
                param.copy_(self.device_weights[name])

    @checked("poptorch.PoplarExecutor.copyWeightsToDevice")
    def copyWeightsToDevice(self):
        self._require_compiled()
        self.device_weights = {n: p.detach().clone() for n, p in self._params().items()}

    @checked("poptorch.PoplarExecutor.setOptimizer")
    def setOptimizer(self, optimizer):
        self.optimizer = optimizer
        optimizer.executor = self
        self.hyper = self._hyperparameters(optimizer)
        if self.device_optimizer is not None:
            for group, values in zip(self.device_optimizer.param_groups, self.hyper["groups"]):
                group.update(values)

    @checked("poptorch.PoplarExecutor.destroy")
    def destroy(self):
        RECORD.attached.pop(id(self), None)
        self.attached = self.compiled = False

    def _read_optimizer_state(self) -> Dict[str, torch.Tensor]:
        state = {}
        for param, values in self.device_optimizer.state.items():
            for prefix, key in STATE_PREFIXES:
                state[prefix + self.names[id(param)]] = values[key].clone()
        return state

    def _write_optimizer_state(self):
        pending = self.optimizer.pending_ipu_state
        if pending is None or self.device_optimizer is None:
            return
        for name, param in self._params().items():
            if not any(prefix + name in pending for prefix, _ in STATE_PREFIXES):
                continue
            state = self.device_optimizer.state[param]
            state.setdefault("step", torch.tensor(0.0))
            state.setdefault("exp_avg", torch.zeros_like(param))
            state.setdefault("exp_avg_sq", torch.zeros_like(param))
            for prefix, key in STATE_PREFIXES:
                if prefix + name in pending:
                    state[key] = pending[prefix + name].clone().to(state[key].dtype)
        self.optimizer.pending_ipu_state = None

    # -- execution --
    @checked("poptorch.PoplarExecutor.__call__")
    def __call__(self, *args, **kwargs):
        args = list(args) + list(kwargs.values())
        if not self.compiled:
            self._compile(args)
        elif not self.attached:
            self.attachToDevice()
        host = {n: p.detach().clone() for n, p in self._params().items()}
        with torch.no_grad():
            for name, param in self._params().items():
                param.copy_(self.device_weights[name])
        try:
            with torch.random.fork_rng(devices=[]):  # the host's generator is not the device's
                torch.set_rng_state(self.device_rng)
                out = self._train(args) if self.training else self._infer(args)
                self.device_rng = torch.get_rng_state()
            self.device_weights = {n: p.detach().clone() for n, p in self._params().items()}
        finally:
            with torch.no_grad():
                for name, param in self._params().items():
                    param.copy_(host[name])
        return out

    def _infer(self, args):
        with torch.no_grad():
            return torch.cat([self._user_model(*micro) for micro in self._split(args)], dim=0)

    def _train(self, args):
        micros = self._split(args)
        per_step = self._replicas * self._accumulation
        reduction = self._options.Training.value("accumulationAndReplicationReductionType", "reduction_type",
                                                 ReductionType.Mean)
        scale = self.hyper["loss_scaling"]
        outputs = []
        for start in range(0, len(micros), per_step):
            self.device_optimizer.zero_grad(set_to_none=True)
            for micro in micros[start:start + per_step]:
                loss = self._user_model(*micro)
                (loss * scale).backward()
                outputs.append(loss.detach())
            with torch.no_grad():
                divisor = scale * (per_step if reduction == ReductionType.Mean else 1)
                for param in self._user_model.parameters():
                    if param.grad is not None:
                        param.grad /= divisor
            if self.hyper["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(self._user_model.parameters(), self.hyper["max_grad_norm"])
            self.device_optimizer.step()
        losses = torch.stack(outputs).reshape(self._device_iterations, self._replicas, self._accumulation)
        mode = self._opt("outputMode", "output_mode", OutputMode.Final)
        if mode == OutputMode.Sum:
            per_replica = losses.sum(dim=(0, 2))
        elif mode == OutputMode.All:
            return losses.reshape(-1)
        else:
            per_replica = losses[-1, :, -1]
        return per_replica if self._replicas > 1 else per_replica[0]


@checked("poptorch.trainingModel", method=False)
def trainingModel(model, options=None, optimizer=None):
    if optimizer is None:
        raise AssertionError("the stand-in refuses trainingModel without an optimizer: the real one would "
                             "silently train with SGD at lr 0.01")
    return PoplarExecutor(model, options, training=True, optimizer=optimizer)


@checked("poptorch.inferenceModel", method=False)
def inferenceModel(model, options=None):
    return PoplarExecutor(model, options, training=False)


PUBLIC = {
    "Options": Options, "TensorLocationSettings": TensorLocationSettings, "Stage": Stage, "Phase": Phase,
    "PipelinedExecution": PipelinedExecution, "ShardedExecution": ShardedExecution,
    "SerialPhasedExecution": SerialPhasedExecution, "ParallelPhasedExecution": ParallelPhasedExecution,
    "BeginBlock": BeginBlock, "identity_loss": identity_loss,
    "ipuHardwareIsAvailable": ipuHardwareIsAvailable, "trainingModel": trainingModel,
    "inferenceModel": inferenceModel, "OutputMode": OutputMode, "ReductionType": ReductionType,
    "Liveness": Liveness, "AutoStage": AutoStage, "Error": Error, "PoplarExecutor": PoplarExecutor,
}


def install(monkeypatch, ipus: int = 64) -> Record:
    """Make `import poptorch` give this stand-in, with `ipus` IPUs present; returns the record."""
    global RECORD
    RECORD = Record(ipus)
    module = types.ModuleType("poptorch", "A stand-in for the Poplar SDK's poptorch (tests only).")
    module.__spec__ = importlib.machinery.ModuleSpec("poptorch", None)
    optim = types.ModuleType("poptorch.optim")
    optim.AdamW = AdamW
    for name, value in PUBLIC.items():
        setattr(module, name, value)
    module.optim = optim
    monkeypatch.setitem(sys.modules, "poptorch", module)
    monkeypatch.setitem(sys.modules, "poptorch.optim", optim)
    return RECORD
