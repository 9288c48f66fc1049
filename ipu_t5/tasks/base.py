"""What a text-to-text task is: an input template over named columns, a target, a metric and a
postprocessor that turns generated text into what the metric compares."""
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


@dataclass(frozen=True)
class Task:
    """A text-to-text task.

    `input_template` is a `str.format` template over the data's columns; `target_column` holds the
    target (text, or a class label that `target_text` names); `metric` names a local `evaluate`
    module under `ipu_t5/metrics`.
    """

    name: str
    input_template: str
    target_column: str
    metric: str
    # (path, name) for `datasets.load_dataset`, where the real data lives on the hub.
    hub_dataset: Optional[Tuple[str, str]] = None

    @property
    def input_columns(self) -> List[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.input_template) if f]

    @property
    def required_columns(self) -> List[str]:
        return self.input_columns + [self.target_column]

    @property
    def metric_path(self) -> str:
        """Directory of the local `evaluate` module, so `evaluate.load` works offline."""
        return str(METRICS_DIR / self.metric)

    def check_columns(self, columns: Sequence[str], where: str) -> None:
        """Refuse data that lacks a column the template or target needs."""
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise UserError(
                "{} has no column {} needed by task '{}' (it has: {}). Rename the columns or "
                "choose the task that fits the data.".format(
                    where, ", ".join(repr(c) for c in missing), self.name, ", ".join(columns) or "none"))

    def normalize(self, example: Dict[str, Any], where: str) -> Dict[str, Any]:
        """Validate one raw example; returns it with the target in canonical form."""
        for column in self.input_columns:
            if example[column] is None or not str(example[column]).strip():
                raise UserError("{} has an empty '{}' field: every example needs text there.".format(where, column))
        return example

    def source_text(self, example: Dict[str, Any]) -> str:
        """The encoder prompt."""
        return self.input_template.format(**{c: example[c] for c in self.input_columns})

    def target_text(self, example: Dict[str, Any]) -> str:
        """The decoder target."""
        return str(example[self.target_column])

    def reference(self, example: Dict[str, Any]) -> Any:
        """What the metric compares a prediction with."""
        return self.target_text(example)

    def postprocess(self, generated: List[str]) -> List[Any]:
        """Generated text to metric predictions."""
        return [g.strip() for g in generated]

    def report(self, predictions: List[Any], references: List[Any]) -> Dict[str, Any]:
        """Task-specific extras for eval_results.json beyond the metric itself."""
        return {}

    def demo_splits(self, seed: int, train_size: int, eval_size: int) -> Dict[str, List[Dict[str, Any]]]:
        """Generated offline data, keyed by split name."""
        raise UserError("task '{}' has no demo data: set data.source to hub or files.".format(self.name))


TaskFactory = Callable[[], Task]
