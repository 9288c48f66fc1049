"""The stand-in's executors and optimizer: poptorch's semantics on the CPU, weights and optimizer
state "on the device", the compile-time rules (see the package's docstring)."""
from typing import Dict, List, Optional

import torch

from . import api
from .api import Error, Options, OutputMode, ReductionType, checked
from .strategies import PipelinedExecution

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
        self.checkpoints: List[tuple] = []  # (block, shape) of its graph's recomputation checkpoints
        self.device_rng: Optional[torch.Tensor] = None
        self.num_ipus = 0
        self.stages = 1
        if optimizer is not None:
            optimizer.executor = self
            self.hyper = self._hyperparameters(optimizer)
        api.RECORD.executors.append(self)

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
        if api.RECORD.ipus == 0:
            raise Error("No IPU detected in the system.")
        micro = self._split(args)[0]
        self._options._Popart.check(self.training, micro)
        first_checkpoint = len(api.RECORD.checkpoints)
        api.RECORD.trace, api.RECORD.tracing = [], True
        try:
            with torch.no_grad():
                self._user_model(*micro)
        finally:
            api.RECORD.tracing = False
        self.trace = list(api.RECORD.trace)
        self.checkpoints = api.RECORD.checkpoints[first_checkpoint:]
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
            strategy._check_phases(api.RECORD.ipus // self._replicas)
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
        if sum(api.RECORD.attached.values()) + self.num_ipus > api.RECORD.ipus:
            raise Error("Failed to acquire {} IPUs: {} of {} are attached to another executable".format(
                self.num_ipus, sum(api.RECORD.attached.values()), api.RECORD.ipus))
        api.RECORD.attached[id(self)] = self.num_ipus
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
        api.RECORD.attached.pop(id(self), None)
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
        api.RECORD.attached.pop(id(self), None)
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
                # Batch serialisation runs the micro-batch's slices one after another in the
                # program; their gradients accumulate, and the loss is theirs added up.
                loss = 0
                for piece in self._options._Popart.slices(micro):
                    part = self._user_model(*piece)
                    (part * scale).backward()
                    loss = loss + part.detach()
                outputs.append(loss)
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
