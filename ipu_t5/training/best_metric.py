"""The best validation result so far, and early stopping on it.

The rule is Hugging Face's EarlyStoppingCallback's: an evaluation improves on the best when its
metric is better in the configured direction by more than the threshold; training stops after
`patience` evaluations in a row that do not.
"""
from typing import Any, Dict, Optional

from ..errors import UserError


class BestMetric:
    """Tracks one validation metric over evaluations: the best value, its step, and whether the
    last one was best.

    `metric` None follows the task's lead score (an evaluation's "main_metric"); `greater_is_better`
    None is Hugging Face's rule: greater is better unless the metric is a loss.
    """

    def __init__(self, metric: Optional[str] = None, greater_is_better: Optional[bool] = None,
                 patience: Optional[int] = None, threshold: float = 0.0):
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.threshold = threshold
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_is_best = False
        self.evals_without_improvement = 0

    def _greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not str(self.metric).endswith("loss")

    def update(self, result: Dict[str, Any], step: int) -> bool:
        """Record an evaluation's result at `step`; returns whether it is the new best."""
        if self.metric is None:
            self.metric = result["main_metric"]
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numbers = [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            raise UserError("validation.metric_for_best_model is '{}', but validation reports no such number "
                            "(it reports: {}).".format(self.metric, ", ".join(numbers)))
        if self.best is None:
            improved = True
        elif self._greater():
            improved = value > self.best + self.threshold
        else:
            improved = value < self.best - self.threshold
        self.last_is_best = improved
        if improved:
            self.best, self.best_step, self.evals_without_improvement = float(value), step, 0
        else:
            self.evals_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """Whether the last `patience` evaluations all failed to improve on the best."""
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to go on comparing with the same best."""
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "last_is_best": self.last_is_best, "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Continue from `state_dict()`'s output; a record of another metric (or none) starts afresh."""
        if not state or (self.metric is not None and state.get("metric") != self.metric):
            return
        self.metric = state["metric"]
        self.best, self.best_step = state["best"], state["best_step"]
        self.last_is_best = state.get("last_is_best", False)
        self.evals_without_improvement = state["evals_without_improvement"]
