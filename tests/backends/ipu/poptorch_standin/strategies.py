"""Execution strategies, blocks and the graph-building functions of the stand-in: poptorch's
placement and phase rules (see the package's docstring)."""
from typing import Optional

import torch

from . import api
from .api import AutoStage, Error, Liveness, _Strategy, checked

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
        if api.RECORD.tracing:
            api.RECORD.trace.append((self.user_id, self.ipu_id))


@checked("poptorch.BeginBlock", method=False)
def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
    if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
        raise Error("module has already been assigned to a block.")
    layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
    api.RECORD.placements.append((layer_to_call, user_id, ipu_id))
    return layer_to_call


@checked("poptorch.recomputationCheckpoint", method=False)
def recomputationCheckpoint(*tensors):
    """Marks tensors to keep for the backward pass when recomputation is on (an identity here).
    Traced, it must be inside a block, as every op; the record keeps (block, shape) per tensor."""
    if api.RECORD.tracing:
        if not api.RECORD.trace:
            raise Error("No active Block, all the ops must belong to a Block")
        block = api.RECORD.trace[-1][0]
        api.RECORD.checkpoints += [(block, tuple(t.shape)) for t in tensors]
    return tensors[0] if len(tensors) == 1 else list(tensors)


@checked("poptorch.identity_loss", method=False)
def identity_loss(x, reduction):
    assert reduction in ("sum", "mean", "none"), "reduction must be sum, mean or none"
    return {"sum": torch.sum, "mean": torch.mean, "none": lambda t: t}[reduction](x)


@checked("poptorch.ipuHardwareIsAvailable", method=False)
def ipuHardwareIsAvailable(num_ipus=1):
    return api.RECORD.ipus >= num_ipus and api.RECORD.ipus > 0
