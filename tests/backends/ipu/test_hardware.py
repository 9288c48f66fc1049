"""The IPU backend on real IPUs, with the SDK's poptorch: run where poptorch reports IPU hardware
(`pytest -m ipu` on an IPU-Pod); skipped, with that reason, everywhere else."""
import pytest
import torch

from ipu_t5.backends.ipu.backend import ipu_hardware_available

pytestmark = [pytest.mark.ipu, pytest.mark.core, pytest.mark.slow,
              pytest.mark.skipif(not ipu_hardware_available(),
                                 reason="needs Graphcore IPUs: poptorch is not installed or reports no IPU hardware")]


def test_tiny_trains_generates_and_exports_on_ipus(make_config):
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.training.trainer import T5Trainer

    config = make_config(**{"layout.backend": "ipu", "layout.stages": 2, "training.max_steps": 20,
                            "validation.per_device_eval_batch_size": 16})
    trainer = T5Trainer(config)
    try:
        summary = trainer.train()
        results = trainer.evaluate()
        hf_dir = trainer.export_hf()
    finally:
        trainer.close()
    assert trainer.backend.name == "ipu" and summary["final_loss"] < 10 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert results["num_samples"] > 0
    prompts = [trainer.eval_features[i]["prompt"] for i in range(4)]
    assert len(reload_and_predict(hf_dir, prompts)) == 4


def test_optimizer_state_survives_a_round_trip_by_name(make_config):
    from ipu_t5.training.trainer import T5Trainer

    config = make_config(**{"layout.backend": "ipu", "training.max_steps": 2})
    trainer = T5Trainer(config)
    try:
        trainer.train()
        saved = trainer.backend.optimizer_state_dict()
        trainer.backend.load_optimizer_state_dict(saved)
        again = trainer.backend.optimizer_state_dict()
    finally:
        trainer.close()
    assert saved and set(saved) == set(again)
    for name, entry in saved.items():
        torch.testing.assert_close(again[name]["exp_avg"], entry["exp_avg"])
