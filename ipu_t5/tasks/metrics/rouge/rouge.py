"""ROUGE-1, ROUGE-2 and ROUGE-L as a local `evaluate` module over `rouge_score`, so it loads
offline, where `evaluate.load("rouge")` would fetch its script from the hub."""
import datasets
import evaluate

_DESCRIPTION = ("Mean ROUGE F-measure of predictions against references: unigram (rouge1) and bigram "
                "(rouge2) overlap, and the longest common subsequence (rougeL). Text is lower-cased and "
                "split on non-alphanumerics by rouge_score's tokenizer.")
_CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated summaries.
    references (list of str): reference summaries.
    use_stemmer (bool): Porter-stem words before matching (default False, as evaluate's rouge).
Returns:
    rouge1, rouge2, rougeL (float): mean F-measure over the examples, in [0, 1].
"""
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, use_stemmer=False):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for key in ROUGE_TYPES:
                totals[key] += scores[key].fmeasure
        count = len(references)
        return {key: total / count if count else 0.0 for key, total in totals.items()}
