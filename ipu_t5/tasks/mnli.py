"""MNLI as text to text, the way Flan-T5 was fine-tuned on it."""
from typing import Any, Dict, List

from ..errors import UserError
from .base import Task
from .demo.mnli import generate_splits

LABELS = ("entailment", "neutral", "contradiction")
INVALID = -1


def label_id(value: Any) -> int:
    """0/1/2 or a label name (any case) to the GLUE label id; anything else is not a label."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        if 0 <= number < len(LABELS):
            return number
    elif isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS.index(value.strip().lower())
    raise ValueError(value)


def postprocess_mnli_predictions(generated: List[str]) -> List[int]:
    """Generated text to label ids; text that names no label becomes -1 (counted wrong, reported
    as invalid)."""
    names = {name: index for index, name in enumerate(LABELS)}
    return [names.get(text.strip().lower(), INVALID) for text in generated]


class MnliTask(Task):
    """premise + hypothesis -> entailment | neutral | contradiction."""

    label_targets = True

    def normalize(self, example: Dict[str, Any], where: str) -> Dict[str, Any]:
        example = super().normalize(example, where)
        try:
            example[self.target_column] = label_id(example[self.target_column])
        except ValueError:
            raise UserError(
                "{} has label {!r}, outside the known set: use 0/1/2 or {}.".format(
                    where, example[self.target_column], "/".join(LABELS))) from None
        return example

    def target_text(self, example: Dict[str, Any]) -> str:
        return LABELS[label_id(example[self.target_column])]

    def reference(self, example: Dict[str, Any]) -> int:
        return label_id(example[self.target_column])

    def postprocess(self, generated: List[str]) -> List[int]:
        return postprocess_mnli_predictions(generated)

    def report(self, predictions: List[int], references: List[int]) -> Dict[str, Any]:
        per_class = {}
        for index, name in enumerate(LABELS):
            per_class[name] = {
                "total": sum(1 for r in references if r == index),
                "correct": sum(1 for p, r in zip(predictions, references) if r == index and p == r),
                "predicted": sum(1 for p in predictions if p == index),
            }
        return {"per_class": per_class, "invalid": sum(1 for p in predictions if p == INVALID)}


def mnli() -> Task:
    return MnliTask(
        name="mnli",
        input_template="mnli hypothesis: {hypothesis} premise: {premise}",
        target_column="label",
        metric="accuracy",
        hub_dataset=("glue", "mnli"),
        main_metric="accuracy",
        eval_split="validation_mismatched",
        demo=generate_splits,
    )


# GLUE's submission file for each MNLI test split, by what the split's name ends with.
GLUE_FILES = (("mismatched", "MNLI-mm.tsv"), ("matched", "MNLI-m.tsv"))


def glue_file_name(split: str, task: Task) -> str:
    """The GLUE submission file for `split` (MNLI-m.tsv for *matched, MNLI-mm.tsv for *mismatched);
    checked before anything is generated, so a wrong split costs no prediction run."""
    if task.name != "mnli":
        raise UserError("--glue-submission writes MNLI's files; task '{}' has no GLUE submission format.".format(
            task.name))
    name = next((file for suffix, file in GLUE_FILES if split.lower().endswith(suffix)), None)
    if name is None:
        raise UserError("--glue-submission needs the split named test_matched or test_mismatched (got '{}'): give "
                        "--data-files test_matched=PATH (or test_mismatched=PATH).".format(split))
    return name


def write_glue_submission(directory, split: str, task: Task, indices: List[Any], predictions: List[int]):
    """GLUE's submission file for an MNLI test split (`index` and the label name, tab-separated),
    named by `glue_file_name`. A prediction that names no label is written as the most frequent
    predicted label (GLUE takes only labels), and counted in the warning printed. Returns the file's
    path."""
    import sys
    from collections import Counter
    from pathlib import Path

    name = glue_file_name(split, task)
    valid = [p for p in predictions if p != INVALID]
    fallback = Counter(valid).most_common(1)[0][0] if valid else 0
    invalid = len(predictions) - len(valid)
    if invalid:
        print("ipu-t5: warning: {} of {} predictions name no label; written as '{}'.".format(
            invalid, len(predictions), LABELS[fallback]), file=sys.stderr)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path), "w") as f:
        f.write("index\tprediction\n")
        for index, prediction in zip(indices, predictions):
            f.write("{}\t{}\n".format(index, LABELS[prediction if prediction != INVALID else fallback]))
    return path
