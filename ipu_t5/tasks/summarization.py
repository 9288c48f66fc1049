"""Summarization scored by ROUGE-1/2/L, with XSum's columns (document -> summary)."""
from typing import Any, Dict, List

from .base import Task
from .demo.summarization import generate_splits


class SummarizationTask(Task):
    """document -> a one-sentence summary."""

    def report(self, predictions: List[str], references: List[str]) -> Dict[str, Any]:
        # ROUGE rewards length; mean lengths show a model padding its summaries out.
        def words(texts: List[str]) -> float:
            return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0

        return {"prediction_words": words(predictions), "reference_words": words(references),
                "empty_predictions": sum(1 for p in predictions if not p)}


def summarization() -> Task:
    return SummarizationTask(
        name="summarization",
        input_template="summarize: {document}",
        target_column="summary",
        metric="rouge",
        main_metric="rougeL",
        demo=generate_splits,
    )
