"""Prompt and target formatting against hand-written expectations; postprocessing."""
import pytest

from ipu_t5.tasks import get_task, postprocess_mnli_predictions

pytestmark = pytest.mark.core


def test_mnli_prompt_and_target():
    task = get_task("mnli")
    example = {"premise": "A man plays a guitar.", "hypothesis": "A man makes music.", "label": 0}
    assert task.source_text(example) == "mnli hypothesis: A man makes music. premise: A man plays a guitar."
    assert [task.target_text(dict(example, label=i)) for i in range(3)] == ["entailment", "neutral", "contradiction"]
    assert task.target_text(dict(example, label="Contradiction")) == "contradiction"
    assert task.reference(dict(example, label="neutral")) == 1
    assert task.required_columns == ["hypothesis", "premise", "label"]


def test_postprocess_maps_labels_and_flags_the_rest():
    generated = ["entailment", " Neutral ", "contradiction", "", "entailment entailment", "2", "maybe"]
    assert postprocess_mnli_predictions(generated) == [0, 1, 2, -1, -1, -1, -1]


def test_report_counts_per_class_and_invalid():
    report = get_task("mnli").report([0, 1, -1, 2, 2], [0, 2, 1, 2, 1])
    assert report["invalid"] == 1
    assert report["per_class"]["contradiction"] == {"total": 2, "correct": 1, "predicted": 2}
    assert report["per_class"]["neutral"] == {"total": 2, "correct": 0, "predicted": 1}
