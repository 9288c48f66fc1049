"""What a text-to-text task is: an input template over named columns, a target, a metric and a
postprocessor that turns generated text into what the metric compares."""
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"

DemoSplits = Dict[str, List[Dict[str, Any]]]
# (seed, train size, eval size) -> generated rows by split name.
DemoGenerator = Callable[[int, int, int], DemoSplits]


def _strip(text: str) -> str:
    return text.strip()


def _lower(text: str) -> str:
    return text.strip().lower()


# How generated text becomes a prediction, by the name `task.postprocess` gives.
POSTPROCESSORS: Dict[str, Callable[[str], str]] = {"strip": _strip, "lower": _lower}


def template_columns(template: str) -> List[str]:
    """The column names a `str.format` template uses, in order of first use.

    Refuses templates `str.format` cannot fill from named columns: broken braces, empty or
    positional fields (`{}`, `{0}`), attribute or index access, and templates that use no column.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError("input template {!r} is not a valid format string ({}): write columns as "
                        "{{column}} and literal braces as {{{{ }}}}.".format(template, err)) from None
    columns: List[str] = []
    for name in fields:
        if not name.strip() or name.isdigit():
            raise UserError("input template {!r} has an empty or positional field {{{}}}: name a data "
                            "column inside the braces, e.g. {{document}}.".format(template, name))
        if any(c in name for c in ".[]"):
            raise UserError("input template {!r} has field {{{}}}: fields are plain column names, "
                            "without attribute or index access.".format(template, name))
        if name not in columns:
            columns.append(name)
    if not columns:
        raise UserError("input template {!r} uses no column, so every prompt would be the same: "
                        "put the data's columns in braces, e.g. 'summarize: {{document}}'.".format(template))
    return columns


def metric_directory(metric: str) -> Path:
    """The directory of an `evaluate` module: one shipped under ipu_t5/tasks/metrics, or a user's own."""
    shipped = METRICS_DIR / metric
    if "/" not in metric and (shipped / (metric + ".py")).is_file():
        return shipped
    own = Path(metric).expanduser()
    if own.is_dir() and (own / (own.name + ".py")).is_file():
        return own
    known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / (p.name + ".py")).is_file())
    raise UserError("metric '{}' is neither a shipped metric ({}) nor a directory holding an evaluate "
                    "module named after it (DIR/DIR.py).".format(metric, ", ".join(known)))


@dataclass(frozen=True)
class Task:
    """A text-to-text task.

    `input_template` is a `str.format` template over the data's columns; `target_column` holds the
    target (text, or a class label that `target_text` names); `metric` names a local `evaluate`
    module under `ipu_t5/tasks/metrics` (or a directory holding one); `main_metric` is the score the run
    summary leads with (None: the metric's first).
    """

    name: str
    input_template: str
    target_column: str
    metric: str
    # (path, name) for `datasets.load_dataset`, where the real data lives on the hub.
    hub_dataset: Optional[Tuple[str, Optional[str]]] = None
    postprocessor: str = "strip"
    main_metric: Optional[str] = None
    # The split validated on when data.eval_split is not set.
    eval_split: str = "validation"
    demo: Optional[DemoGenerator] = None
    # Whether the target is a class label whose metric and postprocessor belong together, so the
    # config may not swap either.
    label_targets = False

    def __post_init__(self):
        template_columns(self.input_template)
        if not self.target_column.strip():
            raise UserError("task '{}' has an empty target column: set task.target_column.".format(self.name))
        metric_directory(self.metric)
        if self.postprocessor not in POSTPROCESSORS and not self.label_targets:
            raise UserError("task.postprocess must be one of {}, got '{}'.".format(
                ", ".join(sorted(POSTPROCESSORS)), self.postprocessor))

    @cached_property
    def input_columns(self) -> List[str]:
        # Cached: `normalize` asks for every example.
        return template_columns(self.input_template)

    @property
    def required_columns(self) -> List[str]:
        return self.input_columns + [c for c in [self.target_column] if c not in self.input_columns]

    @property
    def metric_path(self) -> str:
        """Directory of the `evaluate` module, so `evaluate.load` works offline."""
        return str(metric_directory(self.metric))

    def check_columns(self, columns: Sequence[str], where: str) -> None:
        """Refuse data that lacks a column the template or target needs."""
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise UserError(
                "{} has no column {} needed by task '{}' (it has: {}). Rename the columns, set "
                "task.input_template / task.target_column to the data's names, or choose the task that "
                "fits the data.".format(where, ", ".join(repr(c) for c in missing), self.name,
                                         ", ".join(columns) or "none"))

    def normalize(self, example: Dict[str, Any], where: str) -> Dict[str, Any]:
        """Validate one raw example; returns it with the target in canonical form."""
        for column in self.input_columns + ([] if self.label_targets else [self.target_column]):
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
        return [POSTPROCESSORS[self.postprocessor](g) for g in generated]

    def report(self, predictions: List[Any], references: List[Any]) -> Dict[str, Any]:
        """Task-specific extras for eval_results.json beyond the metric itself."""
        return {}

    def demo_splits(self, seed: int, train_size: int, eval_size: int) -> DemoSplits:
        """Generated offline data, keyed by split name."""
        if self.demo is None:
            raise UserError("task '{}' has no generated demo data: give your own files with --data-files "
                            "train=PATH,validation=PATH.".format(self.name))
        return self.demo(seed, train_size, eval_size)


TaskFactory = Callable[[], Task]
