"""Figures of a run, drawn from the files it wrote (metrics.jsonl, eval_results.json) and saved
beside them: the training loss curve and the validation scores.

matplotlib is needed only here (`pip install matplotlib`); figures are built with its
object-oriented API, so nothing touches pyplot's global state and a notebook shows the returned
`Figure` as it is.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from ..errors import UserError

LOSS_FIGURE = "loss_curve.png"
SCORES_FIGURE = "eval_scores.png"
Record = Dict[str, Any]


def read_metrics(output_dir: Union[str, Path]) -> Tuple[List[Record], List[Record]]:
    """Training and evaluation records of the latest run in `output_dir`'s metrics.jsonl.

    Training records carry a loss; the others are validations. A training step that does not
    follow the previous one starts the records anew, so a run repeated in the same directory is
    not drawn over its predecessor.
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError("no metrics.jsonl in '{}': train first (trainer.train()).".format(output_dir))
    train: List[Record] = []
    evals: List[Record] = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "event" in record:  # a restart, neither a step nor a validation
                continue
            if "loss" in record:
                if train and record["step"] <= train[-1]["step"]:
                    train, evals = [], []
                train.append(record)
            else:
                evals.append(record)
    return train, evals


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("drawing figures needs matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_loss(output_dir: Union[str, Path], smoothing: int = 10):
    """The training loss per step, with a moving average over `smoothing` steps; saved as
    loss_curve.png beside metrics.jsonl. Returns the matplotlib Figure."""
    train, _ = read_metrics(output_dir)
    if not train:
        raise UserError("metrics.jsonl in '{}' holds no training steps yet.".format(output_dir))
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    window = max(1, min(smoothing, len(losses)))
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="mean of {} steps".format(window))
    ax.set_xlabel("optimizer step")
    # Log scale: the first steps fall by orders of magnitude, later progress would look flat.
    ax.set_yscale("log")
    ax.set_ylabel("token cross-entropy (log scale)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(str(Path(output_dir) / LOSS_FIGURE))
    return fig


def plot_scores(output_dir: Union[str, Path]):
    """Validation scores: the main score at every validation during training, and the last
    validation's breakdown (per class where the task reports classes, e.g. MNLI's accuracy per
    label; otherwise each score); saved as eval_scores.png. Returns the matplotlib Figure."""
    results_path = Path(output_dir) / "eval_results.json"
    if not results_path.is_file():
        raise UserError("no eval_results.json in '{}': validate first (trainer.evaluate()).".format(output_dir))
    results = json.loads(results_path.read_text())
    main = results["main_metric"]
    _, evals = read_metrics(output_dir)
    history = [r for r in evals if main in r]
    fig = _figure(11, 4)
    over_steps, breakdown = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    over_steps.plot([r["step"] for r in history], [r[main] for r in history], marker="o", color="tab:green")
    over_steps.set_xlabel("optimizer step")
    over_steps.set_ylabel(main)
    over_steps.set_title("validation {} during training".format(main))
    over_steps.grid(alpha=0.3)
    if "per_class" in results:
        names = list(results["per_class"])
        values = [c["correct"] / c["total"] if c["total"] else 0.0 for c in results["per_class"].values()]
        breakdown.axhline(results[main], color="black", linestyle="--", linewidth=1,
                          label="overall {:.1%}".format(results[main]))
        breakdown.legend(loc="lower right")
        breakdown.set_ylabel("{} per class".format(main))
    else:
        names = list(results["metrics"])
        values = [results[k] for k in names]
    bars = breakdown.bar(names, values, color="tab:green")
    breakdown.bar_label(bars, labels=["{:.1%}".format(v) for v in values])
    breakdown.set_ylim(0, max([1.0] + values) * 1.1)
    split = " ({} split)".format(results["split"]) if results.get("split") else ""
    breakdown.set_title("step {}: {} samples{}".format(results["step"], results["num_samples"], split))
    fig.savefig(str(Path(output_dir) / SCORES_FIGURE))
    return fig
