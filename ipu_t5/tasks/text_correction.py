"""Text correction scored by exact match: a sentence with errors -> the corrected sentence."""
from .base import Task
from .demo.text_correction import generate_splits


def text_correction() -> Task:
    return Task(
        name="text_correction",
        input_template="correct: {text}",
        target_column="corrected",
        metric="exact_match",
        main_metric="exact_match",
        demo=generate_splits,
    )
