"""The one small interface every backend implements; the trainer sees nothing else."""
import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch

from ..config import RunConfig
from ..data.batching import GlobalBatch
from ..data.features import Lengths
from ..errors import UserError
from ..layout import LayoutPlan, plan_from_config


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float
    # The loss or the gradient norm was not finite, so the weights were not updated (the same on
    # every process: both are global before the decision).
    skipped: bool = False


def update_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether a step's global loss and gradient norm allow the optimizer to step: a NaN or an
    infinity in either would carry into every weight (AdamW's moments keep it for good)."""
    return bool(torch.isfinite(loss).all() and torch.isfinite(grad_norm).all())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite. A tensor's smallest and largest values are NaN
    or infinite when any of its values is, so two numbers per tensor are checked instead of a mask
    of its size (63M weights on one CPU thread: 0.013 s against 0.18 s)."""
    bounds = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors if t.is_floating_point() and t.numel()]
    return not bounds or bool(torch.isfinite(torch.cat([b.to(bounds[0].device) for b in bounds])).all())


class Backend(abc.ABC):
    """Runs a T5 under a layout plan: training steps, generation, and the weights by name.

    Implementations own device placement, the optimizer and any process group. Methods that
    return data return the same on every process, so the trainer never asks which rank it is on
    beyond `is_main_process` (who logs and writes files).
    """

    name = "backend"
    # The data's token lengths, set by the trainer before `setup`: backends that compile static
    # shapes (the IPU) pad to them. A backend may also refine `plan` in `setup` (the IPU picks
    # its micro-batch); the trainer reports the backend's plan.
    lengths: Optional[Lengths] = None
    # Whether the backend compiles one prompt length (`lengths.static_source`) that may be shorter
    # than the data's longest prompt: the trainer then tokenizes the data truncated to it.
    static_prompt_length = False
    # How the layout cuts the model into stages by default (`ipu_t5.layout.plan_layout`'s split_by).
    split_by = "memory"
    # The autocast dtype `generate` multiplies in (bfloat16), or None where it computes as the
    # weights are stored: the export's reload check then generates the same way.
    eval_amp_dtype: Optional[torch.dtype] = None

    def __init__(self, config: RunConfig, plan: LayoutPlan):
        self.config = config
        self.plan = plan

    @classmethod
    def layout_plan(cls, config: RunConfig, lengths: Lengths, size=None) -> LayoutPlan:
        """The layout this backend runs for the data's token lengths (its default cut `split_by`) and
        the architecture `size` it builds (`models.model_size`)."""
        return plan_from_config(config, lengths.source, lengths.target, split_by=cls.split_by, size=size)

    @classmethod
    def check_memory(cls, config: RunConfig, plan: LayoutPlan, lengths: Lengths) -> None:
        """Refuse, before any process group or weight, a layout that cannot fit (UserError with the
        plan's table). Backends without a host-side memory plan check nothing here (the IPU plans
        its SRAM when it picks its strategy)."""

    @property
    def is_main_process(self) -> bool:
        return True

    @property
    def process_index(self) -> int:
        """This process's rank among `num_processes` (0 in one process)."""
        return 0

    @property
    def num_processes(self) -> int:
        return 1

    @property
    def description(self) -> str:
        """One line for the start-of-run banner: backend, devices, precision."""
        return self.name

    @abc.abstractmethod
    def setup(self, model) -> None:
        """Build the model from `model`, an `ipu_t5.model_source.ModelSource` (only the part this
        process holds: a meta-device frame materialised on this process's device, its weights read
        or drawn by name), or take a whole `torch.nn.Module` as it is; place it and build the
        optimizer."""

    @abc.abstractmethod
    def train_step(self, batch: GlobalBatch, step: int) -> StepResult:
        """Forward, backward and one optimizer step on a global batch; `step` is 0-based."""

    @abc.abstractmethod
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        """Greedy generation for a batch of feature samples; new token ids per sample, without the
        decoder start token, cut after the first end-of-sequence."""

    def generation_window(self, batch_size: int) -> int:
        """How many prompts one `generate` call should take when validation batches are
        `batch_size`: one batch by default; a pipeline takes several, to keep its stages busy."""
        return batch_size

    @abc.abstractmethod
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's weights by Hugging Face parameter name, on CPU. Every process must call
        it; a multi-process backend returns the weights on the main process only (an empty dict
        elsewhere), since a model split for size may not fit on each rank."""

    @abc.abstractmethod
    def load_model_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights by Hugging Face parameter name, whatever layout saved them.

        `state` may be a lazy mapping that reads a tensor from disk when it is looked up (a
        checkpoint's safetensors file): look up only the names this process holds.
        """

    @abc.abstractmethod
    def optimizer_state_dict(self) -> Dict:
        """Optimizer state keyed by parameter name, so any layout can resume it; like
        `model_state_dict`, on the main process only under several processes."""

    @abc.abstractmethod
    def load_optimizer_state_dict(self, state: Mapping[str, Dict[str, torch.Tensor]]) -> None:
        """Restore optimizer state saved by `optimizer_state_dict` under any layout: {parameter
        name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}, possibly lazy as above."""

    def export_share(self) -> Mapping[str, torch.Tensor]:
        """The weights this process writes in a Hugging Face export, by Hugging Face name: every name
        in exactly one process's share ({} for processes that write none). Every process must call
        it. By default the main process writes the whole model (`model_state_dict`)."""
        return self.model_state_dict()

    def weights_finite(self) -> bool:
        """Whether every weight holds only finite values, the same answer on every process (every
        process must call it): a model that is not is never checkpointed or exported."""
        mine = all_finite(self.export_share().values())
        return all(self.gather_object(mine))

    def checkpoint_state(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """This process's share of the training state, for backends that save through
        torch.distributed.checkpoint; None (the default) has the main process save full tensors
        from `model_state_dict` and `optimizer_state_dict` instead.

        Returns {"model": {hf_name: tensor}, "optimizer": {hf_name: {"exp_avg": tensor,
        "exp_avg_sq": tensor, "step": tensor}}} with the same names under every layout. A tensor held
        by several processes (data-parallel replicas) is written once; tensors may be DTensors
        (FSDP2 shards). Every process calls it, at save and at load: for a load, the optimizer state
        must already exist (initialise it), because the returned tensors are the templates that
        torch.distributed.checkpoint fills in place before `load_checkpoint_state` takes them back.
        """
        return None

    def load_checkpoint_state(self, state: Dict[str, Dict[str, Any]]) -> None:
        """Take back what `checkpoint_state` returned, now holding a checkpoint's values. Only called
        on backends whose `checkpoint_state` returns a dict."""
        raise NotImplementedError("{} returns checkpoint_state() and must implement "
                                  "load_checkpoint_state()".format(type(self).__name__))

    def release_optimizer_state(self) -> None:
        """Free the optimizer's state (AdamW's moments) once training is over, so the export and
        validation that follow have that memory; nothing by default (state kept on a device)."""

    def release_model(self) -> None:
        """Free the model and its optimizer once the run's last export is written, so the main
        process's reload check does not sit on top of its share of the model; the backend then only
        communicates (`on_main`, `gather_object`, ...) and closes. Nothing by default."""

    def extra_state(self) -> Dict[str, Any]:
        """Small JSON-serialisable state of this process, beyond weights and optimizer, that a
        resumed run needs to continue exactly: a device's own random generator (poptorch's
        `PoplarExecutor.rng_state`), a dynamic loss scale. Nothing for a CPU or GPU process, whose
        generators the checkpoint captures itself."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what `extra_state` returned in the process of the same rank; {} when another
        backend (another layout) wrote the checkpoint."""

    def broadcast_object(self, obj):
        """The main process's `obj` on every process (identity in one process)."""
        return obj

    def gather_object(self, obj) -> List[Any]:
        """Every process's `obj`, in rank order, on every process ([obj] in one process)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the main process only and give every process its result. A UserError
        there is raised on every process alike, so no process waits for one that has given up."""
        result, error = None, None
        if self.is_main_process:
            try:
                result = work()
            except UserError as err:
                error = err
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Release devices and process groups."""


def trim_at_eos(ids: List[int], eos_id: int) -> List[int]:
    """Generated ids up to (not including) the first end-of-sequence."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
