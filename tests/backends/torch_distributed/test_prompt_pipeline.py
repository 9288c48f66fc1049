"""Prompt tuning under the torch.distributed pipeline (2 stages x 2 replicas, 1F1B, DDP) against one
process: the same losses, the same soft prompt, the same predictions, and the pipeline's adapter
export loads in plain peft and predicts what its validation predicted."""
import json

import pytest
import torch

from ipu_t5.prompt_tuning import PROMPT_KEY
from tests.backends.torch_distributed.pipeline_worker import PROMPT_TUNING, make_config, result
from tests.backends.torch_distributed.test_pipeline import _assert_losses_equal, _assert_weights_equal, _run_worker

pytest.importorskip("peft", reason="prompt tuning's export needs peft (in setup.py; installed on both stacks)")
pytestmark = pytest.mark.slow


def test_prompt_tuning_under_2x2_matches_one_process(tmp_path):
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.training.trainer import T5Trainer

    trainer = T5Trainer(make_config(tmp_path / "single" / "run", backend="single", extra=PROMPT_TUNING))
    start = trainer.backend.model_state_dict()[PROMPT_KEY].clone()
    trainer.train()
    reference = result(trainer, trainer.evaluate())
    trainer.close()
    found = _run_worker(tmp_path / "2x2", 2, 2, ["1F1B"], "--prompt-tuning")["1F1B"]
    _assert_losses_equal(found["losses"], reference["losses"])
    _assert_weights_equal(found["weights"], reference["weights"])
    assert found["optimized"] == [PROMPT_KEY] and not torch.equal(found["weights"][PROMPT_KEY], start)
    assert found["predictions"] == reference["predictions"]
    run_dir = tmp_path / "2x2" / "1F1B"
    prompts = [json.loads(line)["prompt"] for line in open(run_dir / "eval_predictions.jsonl")]
    assert reload_and_predict(run_dir / "hf", prompts, adapter=run_dir / "adapter") == found["predictions"]
