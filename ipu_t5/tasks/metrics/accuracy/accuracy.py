"""Accuracy as a local `evaluate` module: `evaluate.load(<this directory>)` works offline, where
`evaluate.load("accuracy")` would fetch its script from the hub."""
import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference. Invalid predictions (-1) count as wrong."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label ids; -1 for text that named no label.
    references (list of int): true label ids.
Returns:
    accuracy (float): correct / total, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if references else 0.0}
