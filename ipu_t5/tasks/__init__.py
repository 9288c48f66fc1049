"""The task registry: a task is chosen by name in `data.task` and adjusted, or defined, by the
config's `task` section."""
import dataclasses
from typing import Dict

from ..errors import UserError
from .base import POSTPROCESSORS, Task, TaskFactory
from .mnli import mnli, postprocess_mnli_predictions
from .summarization import summarization
from .text_correction import text_correction

TASKS: Dict[str, TaskFactory] = {"mnli": mnli, "summarization": summarization, "text_correction": text_correction}


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise UserError("unknown task '{}'. Known tasks: {}; or define your own with task.input_template "
                        "and task.target_column.".format(name, ", ".join(sorted(TASKS))))
    return TASKS[name]()


def build_task(config) -> Task:
    """The run's task: the registered `data.task` with the config's `task` keys applied, or, for a
    name that is not registered, the task those keys define (exact match on stripped text unless
    they say otherwise)."""
    name, keys = config.data.task, config.task
    given = {field: value for field, value in (
        ("input_template", keys.input_template), ("target_column", keys.target_column),
        ("metric", keys.metric), ("postprocessor", keys.postprocess)) if value is not None}
    if name not in TASKS:
        if "input_template" not in given or "target_column" not in given:
            raise UserError("task '{}' is not registered (known: {}): to define it, set task.input_template "
                            "and task.target_column (and optionally task.metric, task.postprocess).".format(
                                name, ", ".join(sorted(TASKS))))
        return Task(name=name, **dict({"metric": "exact_match"}, **given))
    task = get_task(name)
    if task.label_targets and ("metric" in given or "postprocessor" in given):
        raise UserError("task '{}' scores class labels with its own metric and postprocessor; task.metric and "
                        "task.postprocess cannot change them. Define a task under a new name to score text "
                        "differently.".format(name))
    if "metric" in given:
        # The registered task's lead score may not exist in another metric: lead with its first.
        given["main_metric"] = None
    return dataclasses.replace(task, **given)


__all__ = ["POSTPROCESSORS", "Task", "TASKS", "build_task", "get_task", "postprocess_mnli_predictions"]
