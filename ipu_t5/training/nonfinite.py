"""Steps whose loss or gradient norm is not finite: counted, and the run stopped after too many in a row.

A backend skips such a step (no optimizer update; see `StepResult.skipped`). The step still counts
as a step of the run, as in Hugging Face's Trainer when its float16 GradScaler skips an update: its
batch is consumed and the learning-rate schedule, a pure function of the step, moves on, so a resumed
run and every layout see the same schedule and data order.
"""
import math
from pathlib import Path
from typing import Any, Dict, Optional

from ..backends.base import StepResult

CAUSES = ("the usual causes: a learning rate too high for this model (lower training.learning_rate or add "
          "training.warmup_steps), or values beyond float16's range (train in bfloat16 or float32)")


class NonfiniteSteps:
    """The run's count of skipped steps, the current streak, and the last finite loss."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.in_row = 0
        self.last_finite_loss: Optional[float] = None
        self.last_finite_step: Optional[int] = None

    def record(self, result: StepResult, step: int) -> None:
        """Account for the step numbered `step` (1-based, as logged)."""
        if result.skipped:
            self.total += 1
            self.in_row += 1
        else:
            self.in_row = 0
            if math.isfinite(result.loss):
                self.last_finite_loss, self.last_finite_step = result.loss, step

    @property
    def exhausted(self) -> bool:
        """Whether the streak has reached the limit: the run must stop."""
        return self.in_row >= self.limit

    def _last_loss(self) -> str:
        if self.last_finite_loss is None:
            return "no step of this run had a finite loss"
        return "the last finite loss was {:.4g} at step {}".format(self.last_finite_loss, self.last_finite_step)

    def stop_message(self, step: int, checkpoint: Optional[Path]) -> str:
        """The one line a run stopped by its streak ends with."""
        return "step {}: the loss or gradient norm was not finite in {} steps in a row " \
               "(training.max_nonfinite_steps), each skipped without updating the weights; {}. {}; {}.".format(
                   step, self.in_row, self._last_loss(), _where_to_resume(checkpoint), CAUSES)

    def broken_weights_message(self, step: int, checkpoint: Optional[Path]) -> str:
        """The one line a run ends with when its weights themselves are no longer finite."""
        return "step {}: the model's weights are not finite, so they were neither checkpointed nor exported; {}. " \
               "{}; {}.".format(step, self._last_loss(), _where_to_resume(checkpoint), CAUSES)

    def state_dict(self) -> Dict[str, Any]:
        return {"total": self.total, "in_row": self.in_row, "last_finite_loss": self.last_finite_loss,
                "last_finite_step": self.last_finite_step}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore a checkpoint's counts (absent in checkpoints written before they were kept)."""
        state = state or {}
        self.total = int(state.get("total", 0))
        self.in_row = int(state.get("in_row", 0))
        self.last_finite_loss = state.get("last_finite_loss")
        self.last_finite_step = state.get("last_finite_step")


def _where_to_resume(checkpoint: Optional[Path]) -> str:
    if checkpoint is None:
        return "The run has no checkpoint to resume from"
    return "The newest intact checkpoint is {} (--resume {} continues from it)".format(checkpoint, checkpoint)
