"""The task registry: a task is chosen by name in `data.task`."""
from typing import Dict

from ..errors import UserError
from .base import Task, TaskFactory
from .mnli import mnli, postprocess_mnli_predictions

TASKS: Dict[str, TaskFactory] = {"mnli": mnli}


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise UserError("unknown task '{}'. Known tasks: {}.".format(name, ", ".join(sorted(TASKS))))
    return TASKS[name]()


__all__ = ["Task", "TASKS", "get_task", "postprocess_mnli_predictions"]
