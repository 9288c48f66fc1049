"""Validation during training: the best result so far, and early stopping on it."""
import json

import pytest

from ipu_t5.training.best_metric import BestMetric
from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.training.trainer import T5Trainer

pytestmark = pytest.mark.core

SMALL = {"data.demo_train_samples": 160, "data.demo_eval_samples": 24, "validation.eval_steps": 2}


class Scripted:
    """A metric that reports the given accuracies, one per evaluation."""

    def __init__(self, values):
        self.values = list(values)

    def compute(self, predictions, references):
        return {"accuracy": self.values.pop(0)}


def _trainer(make_config, values, **settings):
    config = make_config(**dict(SMALL, **settings))
    return T5Trainer(config, accuracy_metric=Scripted(values))


def test_training_stops_when_the_metric_stops_improving(make_config):
    trainer = _trainer(make_config, [0.5, 0.6, 0.6, 0.55, 0.9], **{
        "training.max_steps": 20, "validation.early_stopping_patience": 2})
    summary = trainer.train()
    # Evaluations at steps 2, 4, 6, 8: best 0.6 at step 4, then two without improvement.
    assert summary["steps"] == 8 and summary["stopped_early"] is True
    assert (trainer.best_metric, trainer.best_step) == (0.6, 4)
    assert summary["best_metric"] == 0.6 and summary["best_step"] == 4
    records = [json.loads(line) for line in open(trainer.output_dir / "metrics.jsonl")]
    evals = [r for r in records if "accuracy" in r]
    assert [(e["step"], e["accuracy"], e["is_best"]) for e in evals] == [
        (2, 0.5, True), (4, 0.6, True), (6, 0.6, False), (8, 0.55, False)]


def test_threshold_and_direction(make_config):
    # With a threshold of 0.05, 0.53 is no improvement on 0.5.
    trainer = _trainer(make_config, [0.5, 0.53, 0.54], **{
        "training.max_steps": 20, "validation.early_stopping_patience": 2,
        "validation.early_stopping_threshold": 0.05})
    assert trainer.train()["steps"] == 6 and trainer.best_metric == 0.5
    # Lower is better: falling values keep improving, so training runs to max_steps.
    trainer = _trainer(make_config, [0.5, 0.4, 0.3, 0.2], **{
        "training.max_steps": 8, "validation.early_stopping_patience": 1,
        "validation.greater_is_better": "false", "output.output_dir": str(trainer.output_dir) + "-lower"})
    summary = trainer.train()
    assert summary["steps"] == 8 and summary["stopped_early"] is False and trainer.best_metric == 0.3


def test_best_is_tracked_without_early_stopping(make_config):
    trainer = _trainer(make_config, [0.2, 0.7, 0.4, 0.1], **{"training.max_steps": 6})
    summary = trainer.train()
    assert summary["steps"] == 6 and summary["stopped_early"] is False
    result = trainer.evaluate()
    assert result["best_metric"] == 0.7 and result["best_step"] == 4 and result["is_best"] is False
    assert trainer.last_eval_is_best is False


def test_unknown_metric_for_best_model_is_named(make_config):
    trainer = _trainer(make_config, [0.5], **{"training.max_steps": 4, "validation.metric_for_best_model": "f1"})
    with pytest.raises(UserError, match="metric_for_best_model is 'f1'.*accuracy"):
        trainer.train()


def test_patience_needs_validation_during_training():
    with pytest.raises(UserError, match="early_stopping_patience=3 needs validation during training"):
        load_config("tiny", overrides=["validation.early_stopping_patience=3"])
    with pytest.raises(UserError, match="must be a positive integer"):
        load_config("tiny", overrides=["validation.early_stopping_patience=0", "validation.eval_steps=5"])


def test_best_metric_state_resumes_the_comparison():
    best = BestMetric("accuracy", patience=2)
    for step, value in [(10, 0.4), (20, 0.7), (30, 0.6)]:
        best.update({"accuracy": value}, step)
    resumed = BestMetric("accuracy", patience=2)
    resumed.load_state_dict(best.state_dict())
    assert (resumed.best, resumed.best_step, resumed.evals_without_improvement) == (0.7, 20, 1)
    assert resumed.update({"accuracy": 0.65}, 40) is False and resumed.should_stop
    # A state kept for another metric is not compared with this one.
    other = BestMetric("loss", greater_is_better=False)
    other.load_state_dict(best.state_dict())
    assert other.best is None
