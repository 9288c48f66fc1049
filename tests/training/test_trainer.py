"""T5Trainer on one process: training, the split-invariant loss, validation, the run directory."""
import json

import datasets
import pytest
import torch

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.backends.optim import lr_at
from ipu_t5.training.trainer import T5Trainer

from tests.conftest import losses

pytestmark = pytest.mark.core


def test_short_run_loss_falls_and_is_logged(make_config, tmp_path):
    config = make_config(**{"training.max_steps": 30, "output.report_to_tensorboard": "true"})
    trainer = T5Trainer(config)
    summary = trainer.train()
    trainer.close()
    assert summary["steps"] == 30
    records = [json.loads(line) for line in open(config.output_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second"} <= set(r) for r in records)
    values = [r["loss"] for r in records]
    assert sum(values[-5:]) / 5 < 0.5 * sum(values[:5]) / 5
    assert list((config.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_same_seed_same_run(make_config, tmp_path):
    for name in ("a", "b"):
        T5Trainer(make_config(tmp_path / name, **{"training.max_steps": 4})).train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_gradient_accumulation_does_not_change_the_optimisation(make_config, tmp_path):
    """The loss is normalised by the global batch's target tokens, so 4 micro-batches of 4 take
    the same steps as one batch of 16."""
    whole = T5Trainer(make_config(tmp_path / "whole", **{"training.max_steps": 5}))
    split = T5Trainer(make_config(tmp_path / "split", **{"training.max_steps": 5, "layout.gradient_accumulation_steps": 4}))
    assert split.plan.micro_batches == 4 and split.plan.micro_batch_size == 4
    whole.train()
    split.train()
    for a, b in zip(losses(tmp_path / "whole").values(), losses(tmp_path / "split").values()):
        assert a == pytest.approx(b, rel=1e-5)
    for (name, a), b in zip(whole.backend.model_state_dict().items(), split.backend.model_state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_schedule_warmup_then_linear():
    config = load_config(overrides=["training.warmup_steps=4", "training.lr_scheduler_type=linear",
                                    "training.max_steps=12", "training.learning_rate=1e-3"]).training
    assert [lr_at(s, config) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(8, config) == pytest.approx(5e-4)
    assert lr_at(12, config) == 0.0


def test_evaluate_trained_model(trained):
    results = trained["results"]
    assert results["num_samples"] == 150
    assert results["accuracy"] > 0.6  # an untrained model scores about a third
    per_class = results["per_class"]
    assert sum(c["total"] for c in per_class.values()) == 150
    assert sum(c["correct"] for c in per_class.values()) == round(results["accuracy"] * 150)
    assert sum(c["predicted"] for c in per_class.values()) + results["invalid"] == 150
    saved = json.loads((trained["output_dir"] / "eval_results.json").read_text())
    assert saved["accuracy"] == results["accuracy"]
    lines = (trained["output_dir"] / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 150 and {"prompt", "generated", "prediction", "reference"} <= set(json.loads(lines[0]))


def test_generation_caps_new_tokens_at_the_longest_target(trained):
    trainer = trained["trainer"]
    rows = trainer.eval_features.select(range(4)).to_list()
    for ids in trainer.backend.generate(rows, max_new_tokens=2):
        assert len(ids) <= 2


def test_api_with_user_datasets_metric_and_postprocess(make_config, tmp_path):
    rows = [{"premise": "A man sleeps in the park.", "hypothesis": "A man sleeps.", "label": i % 3} for i in range(48)]
    seen = []

    def postprocess(texts):
        seen.extend(texts)
        return [0 for _ in texts]

    class Always:
        def compute(self, predictions, references):
            return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}

    config = make_config(**{"training.max_steps": 2})
    trainer = T5Trainer(config, None, datasets.Dataset.from_list(rows), datasets.Dataset.from_list(rows[:9]),
                        config.validation, None, Always(), postprocess)
    trainer.train()
    results = trainer.evaluate()
    assert len(seen) == 9
    assert results["accuracy"] == pytest.approx(3 / 9)


def test_dataset_without_columns_is_refused(make_config):
    with pytest.raises(UserError, match="no column 'hypothesis', 'premise'"):
        T5Trainer(make_config(), dataset=datasets.Dataset.from_list([{"text": "x", "label": 0}] * 20))


def test_output_dir_holding_another_run(make_config, tmp_path):
    out = tmp_path / "shared"
    T5Trainer(make_config(out, **{"training.max_steps": 2})).train()
    before = (out / "metrics.jsonl").read_text()
    (out / "notes.txt").write_text("mine")
    other = T5Trainer(make_config(out, **{"training.max_steps": 2, "training.learning_rate": 5e-4}))
    with pytest.raises(UserError, match="holds a different run .*training.learning_rate"):
        other.train()
    assert (out / "metrics.jsonl").read_text() == before
    # The same run continues there from its checkpoint; --overwrite replaces only this project's files.
    resumed = T5Trainer(make_config(out, **{"training.max_steps": 3, "output.resume_from_checkpoint": "auto"}))
    assert resumed.train()["steps_this_run"] == 1
    T5Trainer(make_config(out, **{"training.max_steps": 2, "training.learning_rate": 5e-4,
                                  "output.overwrite_output_dir": "true"})).train()
    assert len(losses(out)) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_unrelated_directory_is_refused(make_config, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="holds no ipu-t5 run"):
        T5Trainer(make_config(out, **{"training.max_steps": 1})).train()
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_the_last_export_frees_the_model_before_its_reload_check_and_then_refuses_to_go_on(make_config, tmp_path):
    from ipu_t5.checkpointing.views import SafetensorsView, weight_files

    trainer = T5Trainer(make_config(**{"training.max_steps": 2, "validation.do_eval": "false"}))
    trainer.train()
    before = {k: v.clone() for k, v in trainer.backend.model_state_dict().items()}
    kept = trainer.export_hf(tmp_path / "kept")
    released = trainer.export_hf(tmp_path / "released", release_model=True)
    assert trainer.backend.model is None and trainer.backend.optimizer is None
    # The same files as an export that kept the model, and the weights the run trained.
    for path in (kept, released):
        exported = SafetensorsView(weight_files(path))
        assert "lm_head.weight" in exported and set(exported) <= set(before)
        assert all(torch.equal(exported[name], before[name]) for name in exported)
    for call in (trainer.train, trainer.evaluate, lambda: trainer.export_hf(tmp_path / "again"),
                 lambda: trainer.save_checkpoint(tmp_path / "ckpt")):
        with pytest.raises(UserError, match="released its model after its last export"):
            call()
    with pytest.raises(UserError, match="cannot write a training checkpoint after releasing the model"):
        T5Trainer(make_config(tmp_path / "other")).export_hf(tmp_path / "x", ckpt_path=tmp_path / "c",
                                                              release_model=True)
