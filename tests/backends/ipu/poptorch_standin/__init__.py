"""A STAND-IN for poptorch, the Poplar SDK's PyTorch-for-IPU package, which cannot be installed here.

This is not poptorch and runs nothing on an IPU. It lets the tests drive the IPU backend on any
machine, and it is held to the real API so that it cannot accept what poptorch would refuse:

- Every function, class, method, property and enum member it offers is looked up in the record of
  the real poptorch 3.3 API (`shared/reference/poptorch-3.3-api.json`, read from graphcore/poptorch),
  and every call is bound against the recorded parameters: a name the real poptorch lacks, or
  arguments it would not bind, raise. The option setters also make the type checks the real ones
  assert (an `OutputMode` for `outputMode`, "IPUn" keys for `setAvailableMemoryProportion`, ...).
- It records the calls (`Record`: every call with its bound arguments, BeginBlock placements,
  executors, the block and shape of each recomputation checkpoint traced) for tests to assert.
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

By job: `api.py` (the reference, binding, the record, enums, options), `popart.py` (PopART session
options through `opts._Popart.set`, held to tests/backends/ipu/reference/popart-session-options.json,
and batch serialisation), `strategies.py` (stages, phases, execution strategies and their rules,
blocks, graph functions), `executor.py` (the optimizer and the executors).
"""
import importlib.machinery
import sys
import types

from . import api, popart  # noqa: F401 (popart registers `_Popart`'s behaviour with api)
# Re-exported for the tests: the reference (API, REFERENCE, signature) and everything poptorch offers.
from .api import (API, REFERENCE, AutoStage, Error, Liveness, Options, OutputMode, Record, ReductionType,
                  TensorLocationSettings, signature)
from .executor import AdamW, PoplarExecutor, inferenceModel, trainingModel
from .strategies import (BeginBlock, ParallelPhasedExecution, Phase, PipelinedExecution, SerialPhasedExecution,
                         ShardedExecution, Stage, identity_loss, ipuHardwareIsAvailable, recomputationCheckpoint)

PUBLIC = {
    "Options": Options, "TensorLocationSettings": TensorLocationSettings, "Stage": Stage, "Phase": Phase,
    "PipelinedExecution": PipelinedExecution, "ShardedExecution": ShardedExecution,
    "SerialPhasedExecution": SerialPhasedExecution, "ParallelPhasedExecution": ParallelPhasedExecution,
    "BeginBlock": BeginBlock, "identity_loss": identity_loss, "recomputationCheckpoint": recomputationCheckpoint,
    "ipuHardwareIsAvailable": ipuHardwareIsAvailable, "trainingModel": trainingModel,
    "inferenceModel": inferenceModel, "OutputMode": OutputMode, "ReductionType": ReductionType,
    "Liveness": Liveness, "AutoStage": AutoStage, "Error": Error, "PoplarExecutor": PoplarExecutor,
}


def install(monkeypatch, ipus: int = 64) -> Record:
    """Make `import poptorch` give this stand-in, with `ipus` IPUs present; returns the record."""
    api.RECORD = Record(ipus)
    module = types.ModuleType("poptorch", "A stand-in for the Poplar SDK's poptorch (tests only).")
    module.__spec__ = importlib.machinery.ModuleSpec("poptorch", None)
    optim = types.ModuleType("poptorch.optim")
    optim.AdamW = AdamW
    for name, value in PUBLIC.items():
        setattr(module, name, value)
    module.optim = optim
    monkeypatch.setitem(sys.modules, "poptorch", module)
    monkeypatch.setitem(sys.modules, "poptorch.optim", optim)
    return api.RECORD
