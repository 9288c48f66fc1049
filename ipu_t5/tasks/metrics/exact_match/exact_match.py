"""Exact match as a local `evaluate` module, so it loads offline."""
import datasets
import evaluate

_DESCRIPTION = ("Fraction of predictions identical to their reference, after collapsing runs of "
                "whitespace and stripping both ends (a tokenizer's decoding may differ there).")
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted texts.
    references (list of str): reference texts.
    ignore_case (bool): compare lower-cased text (default False).
Returns:
    exact_match (float): matches / total, in [0, 1].
"""


def _normal(text, ignore_case):
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False):
        same = sum(_normal(p, ignore_case) == _normal(r, ignore_case) for p, r in zip(predictions, references))
        return {"exact_match": same / len(references) if references else 0.0}
