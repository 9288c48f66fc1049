"""Validation by generation: prompts sorted by length into batches, greedy decoding through the
backend, the task's postprocessing and metric, and the files a validation writes."""
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from tqdm.auto import tqdm


def generate_all(backend, rows: List[Dict], batch_size: int, max_new_tokens: int, show_progress: bool,
                 before_batch: Optional[Callable[[], None]] = None, desc: str = "validation",
                 on_window: Optional[Callable[[List[int], List[List[int]]], None]] = None,
                 ) -> Tuple[List[List[int]], float]:
    """Greedy generation over every row, in batches of similar prompt lengths; the new token ids
    per row (in the rows' order) and the seconds it took. The backend takes
    `backend.generation_window(batch_size)` rows a call (a pipeline several batches). `before_batch`
    runs before each call (the trainer's check for a stop signal); `on_window(indices, ids)` after
    each, with the rows' indices and their ids."""
    # Longest first: similar lengths share a batch, so little padding is generated over.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    generated: List[List[int]] = [[] for _ in rows]
    window = max(1, backend.generation_window(batch_size))
    started = time.perf_counter()
    with tqdm(total=len(rows), desc=desc, unit="sample", disable=not show_progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), window):
            if before_batch is not None:
                before_batch()
            chunk = order[start:start + window]
            found = backend.generate([rows[i] for i in chunk], max_new_tokens)
            for index, ids in zip(chunk, found):
                generated[index] = ids
            if on_window is not None:
                on_window(chunk, found)
            bar.update(len(chunk))
    return generated, time.perf_counter() - started


def score(task, metric, predictions: List[Any], references: List[Any], split: Optional[str], step: int,
          seconds: float) -> Dict[str, Any]:
    """The metric's scores first and flat (results["accuracy"], results["rougeL"]), then what they
    mean: main metric, task, split, sample count, speed and the task's own report."""
    scores = dict(metric.compute(predictions=predictions, references=references))
    result: Dict[str, Any] = dict(scores)
    result.update({"main_metric": task.main_metric or next(iter(scores)), "metrics": list(scores),
                   "task": task.name, "split": split, "num_samples": len(references), "step": step,
                   "eval_seconds": seconds, "samples_per_second": len(references) / seconds if seconds else 0.0})
    result.update(task.report(predictions, references))
    return result


def write_predictions(path: Path, rows: List[Dict], texts: List[str], predictions: List[Any],
                      targets: List[str]) -> None:
    """eval_predictions.jsonl: prompt, generated text, target, prediction and reference per row."""
    with open(path, "w") as f:
        for row, text, prediction, target in zip(rows, texts, predictions, targets):
            f.write(json.dumps({"prompt": row["prompt"], "generated": text, "target": target,
                                "prediction": prediction, "reference": row["reference"]}) + "\n")
