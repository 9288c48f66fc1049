"""The best validation result so far, and early stopping on it.

The rule is Hugging Face's EarlyStoppingCallback's: an evaluation improves on the best when its
metric is better in the configured direction by more than the threshold; training stops after
`patience` evaluations in a row that do not.
"""
from typing import Any, Dict, Optional

from .errors import UserError


class BestMetric:
    """Tracks `metric` over evaluations: the best value, its step, and whether the last one was best."""

    def __init__(self, metric: str, greater_is_better: bool = True, patience: Optional[int] = None,
                 threshold: float = 0.0):
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.threshold = threshold
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_is_best = False
        self.evals_without_improvement = 0

    def update(self, result: Dict[str, Any], step: int) -> bool:
        """Record an evaluation's result at `step`; returns whether it is the new best."""
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numbers = [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            raise UserError("validation.metric_for_best_model is '{}', but validation reports no such number "
                            "(it reports: {}).".format(self.metric, ", ".join(numbers)))
        if self.best is None:
            improved = True
        elif self.greater_is_better:
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
                "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("metric") == self.metric:
            self.best, self.best_step = state["best"], state["best_step"]
            self.evals_without_improvement = state["evals_without_improvement"]
