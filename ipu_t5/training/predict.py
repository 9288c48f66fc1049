"""Predictions for new data: rows checked against the task, generated in blocks, written to a JSON
lines file as they come (resumable after any interruption), and the task's predictions and metrics
returned in the shape of Hugging Face's `Seq2SeqTrainer.predict`.

The file holds one line per row, in row order: {"id", "prompt", "generated", "prediction"} and
"reference" where the data are labelled. Rows are generated a block at a time (BLOCK_BATCHES batches, cut at
fixed row numbers), the block's lines written in row order and flushed to disk (fsync) together.
A rerun reads the file, drops a torn last line, and regenerates from the first block with a missing
row, writing only the missing lines: the blocks, and so the micro-batches and their padding, are those
of an uninterrupted run, so the file ends the same, every row once.
"""
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from tqdm.auto import tqdm

from ..errors import UserError

# Batches generated between two writes of the predictions file (rounded up to whole backend windows,
# `Backend.generation_window`): enough rows for length grouping to cut padding, few enough that an
# interruption loses little (512 rows at the default batch of 64).
BLOCK_BATCHES = 8


class PredictionOutput(NamedTuple):
    """What `T5Trainer.predict` returns, in the spirit of `transformers.trainer_utils.PredictionOutput`:
    the task's predictions (label ids for MNLI), the references where the data are labelled, the
    metrics then (else None), and the generated texts."""

    predictions: List[Any]
    label_ids: Optional[List[Any]]
    metrics: Optional[Dict[str, Any]]
    generated: List[str]


def check_rows(dataset, task, where: str) -> List[Dict[str, Any]]:
    """The rows of `dataset` (a `datasets.Dataset` or a list of dicts), refusing a missing input
    column or an empty prompt field with one line that names the row and the fix."""
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise UserError("{} is empty: it needs at least one row to predict.".format(where))
    for index, row in enumerate(rows):
        missing = [c for c in task.input_columns if c not in row]
        if missing:
            raise UserError("{} row {} has no {} column, which task '{}' builds its prompt from (it has: {}): "
                            "rename the data's columns or set task.input_template to them.".format(
                                where, index, ", ".join(repr(c) for c in missing), task.name, ", ".join(row) or "none"))
        for column in task.input_columns:
            if row[column] is None or not str(row[column]).strip():
                raise UserError("{} row {} has no text in '{}' (the field is missing or empty): every row needs "
                                "text there; fill or remove that row.".format(where, index, column))
    return rows


def references(rows: List[Dict[str, Any]], task) -> Optional[List[Any]]:
    """The metric's references when every row has a valid target (GLUE's test files carry label -1:
    none), else None."""
    found = []
    for row in rows:
        if row.get(task.target_column) is None:
            return None
        try:
            task.normalize(dict(row), "")
            found.append(task.reference(row))
        except (UserError, ValueError, KeyError):
            return None
    return found


class PredictionsFile:
    """The predictions file: which rows it holds, and the lines of new ones appended durably."""

    def __init__(self, path: Path, rows: int):
        self.path = Path(path)
        self.done = self._recover(rows)

    def _recover(self, rows: int) -> int:
        """How many rows the file holds (0 for a new file): a last line cut by an interruption is
        dropped (the file truncated to the last whole line); lines must be rows 0, 1, ... in order."""
        if not self.path.exists():
            return 0
        if self.path.is_dir():
            raise UserError("--out {} is a directory: give a file name, e.g. {}/predictions.jsonl.".format(
                self.path, self.path))
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        lines = whole.splitlines()
        for number, line in enumerate(lines):
            try:
                row_id = json.loads(line)["id"]
            except (ValueError, KeyError, TypeError):
                row_id = None
            if row_id != number:
                raise UserError("{} line {} is not row {} of an earlier prediction run: give another --out, or "
                                "delete the file to start again.".format(self.path, number + 1, number))
        count = len(lines)
        if count > rows:
            raise UserError("{} holds {} rows but the data have {}: it was written for other data; give another "
                            "--out.".format(self.path, count, rows))
        if len(whole) != len(data):
            with open(str(self.path), "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        return count

    def append(self, lines: List[Dict[str, Any]]) -> None:
        """Write the lines and have them on disk before returning."""
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(self.path), "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        self.done += len(lines)


def predict_rows(backend, tokenizer, task, rows: List[Dict[str, Any]], batch_size: int, max_new_tokens: int,
                 prompt_length: int, postprocess: Callable[[List[str]], List[Any]], show_progress: bool,
                 out: Optional[Path] = None, metric=None) -> PredictionOutput:
    """Generate for every row (`rows` checked by `check_rows`) and, with `out`, write the predictions
    file as it goes, continuing it where an earlier run of the same rows stopped. Every process
    calls it; only the main process writes."""
    from .validation import score

    prompts = [task.source_text(r) for r in rows]
    ids = tokenizer(prompts, truncation=True, max_length=prompt_length)["input_ids"]
    samples = [{"input_ids": i, "labels": []} for i in ids]
    labels = references(rows, task)
    window = max(1, backend.generation_window(batch_size))
    block = -(-BLOCK_BATCHES * batch_size // window) * window
    writer = backend.on_main(lambda: PredictionsFile(out, len(rows))) if out is not None else None
    # The rows already written are read back, not generated again.
    written = backend.on_main(lambda: _read_back(writer)) if writer is not None else []
    start = len(written) // block * block
    texts: List[str] = [w["generated"] for w in written[:start]]
    started = time.perf_counter()
    with tqdm(total=len(rows), initial=len(written), desc="predict", unit="sample", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for first in range(start, len(rows), block):
            indices = list(range(first, min(first + block, len(rows))))
            order = sorted(indices, key=lambda i: -len(samples[i]["input_ids"]))
            generated: Dict[int, List[int]] = {}
            for cut in range(0, len(order), window):
                part = order[cut:cut + window]
                for index, found in zip(part, backend.generate([samples[i] for i in part], max_new_tokens)):
                    generated[index] = found
                bar.update(sum(1 for i in part if i >= len(written)))
            decoded = tokenizer.batch_decode([generated[i] for i in indices], skip_special_tokens=True)
            texts += decoded
            if writer is not None and backend.is_main_process:
                predicted = postprocess(decoded)
                lines = []
                for index, text, prediction in zip(indices, decoded, predicted):
                    if index < len(written):
                        continue
                    line = {"id": index, "prompt": prompts[index], "generated": text, "prediction": prediction}
                    if labels is not None:
                        line["reference"] = labels[index]
                    lines.append(line)
                writer.append(lines)
    seconds = time.perf_counter() - started
    predictions = postprocess(texts)
    metrics = None
    if labels is not None:
        if metric is None:
            import evaluate

            metric = evaluate.load(task.metric_path)
        metrics = score(task, metric, predictions, labels, None, 0, seconds)
    return PredictionOutput(predictions, labels, metrics, texts)


def _read_back(writer: PredictionsFile) -> List[Dict[str, Any]]:
    """The rows an earlier run wrote (whole lines only, as `PredictionsFile` recovered them)."""
    if not writer.done:
        return []
    with open(str(writer.path)) as f:
        return [json.loads(line) for _, line in zip(range(writer.done), f)]
