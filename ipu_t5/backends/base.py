"""The one small interface every backend implements; the trainer sees nothing else."""
import abc
from dataclasses import dataclass
from typing import Dict, List

import torch

from ..config import RunConfig
from ..data.batching import GlobalBatch
from ..layout import LayoutPlan


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float


class Backend(abc.ABC):
    """Runs a T5 under a layout plan: training steps, generation, and the weights by name.

    Implementations own device placement, the optimizer and any process group. Methods that
    return data return the same on every process, so the trainer never asks which rank it is on
    beyond `is_main_process` (who logs and writes files).
    """

    name = "backend"

    def __init__(self, config: RunConfig, plan: LayoutPlan):
        self.config = config
        self.plan = plan

    @property
    def is_main_process(self) -> bool:
        return True

    @property
    def description(self) -> str:
        """One line for the start-of-run banner: backend, devices, precision."""
        return self.name

    @abc.abstractmethod
    def setup(self, model: torch.nn.Module) -> None:
        """Take the whole model (on CPU), place it, and build the optimizer."""

    @abc.abstractmethod
    def train_step(self, batch: GlobalBatch, step: int) -> StepResult:
        """Forward, backward and one optimizer step on a global batch; `step` is 0-based."""

    @abc.abstractmethod
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        """Greedy generation for a batch of feature samples; new token ids per sample, without the
        decoder start token, cut after the first end-of-sequence."""

    @abc.abstractmethod
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's weights by Hugging Face parameter name, on CPU. Every process must call
        it; a multi-process backend returns the weights on the main process only (an empty dict
        elsewhere), since a model split for size may not fit on each rank."""

    @abc.abstractmethod
    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load weights by Hugging Face parameter name, whatever layout saved them."""

    @abc.abstractmethod
    def optimizer_state_dict(self) -> Dict:
        """Optimizer state keyed by parameter name, so any layout can resume it; like
        `model_state_dict`, on the main process only under several processes."""

    @abc.abstractmethod
    def load_optimizer_state_dict(self, state: Dict) -> None:
        """Restore optimizer state saved by `optimizer_state_dict` under any layout."""

    def broadcast_object(self, obj):
        """The main process's `obj` on every process (identity in one process)."""
        return obj

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""

    def close(self) -> None:
        """Release devices and process groups."""


def trim_at_eos(ids: List[int], eos_id: int) -> List[int]:
    """Generated ids up to (not including) the first end-of-sequence."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
