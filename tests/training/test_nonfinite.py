"""Steps whose loss or gradient norm is not finite: skipped without touching the weights, counted,
and the run stopped after `training.max_nonfinite_steps` in a row with its last good checkpoint."""
import json

import pytest
import torch

from ipu_t5 import checkpointing
from ipu_t5.errors import UserError
from ipu_t5.training.trainer import T5Trainer

from tests.conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.core


def _poison_gradients_from(trainer, first_step, last_step=None):
    """Make one weight's gradient NaN in the steps [first_step, last_step] (0-based, as the backend
    sees them): the backward the real backend runs then yields a NaN gradient norm."""
    param = next(p for p in trainer.backend.model.parameters() if p.requires_grad)

    def hook(grad):
        poisoned = trainer.step >= first_step and (last_step is None or trainer.step <= last_step)
        return grad * float("nan") if poisoned else grad

    param.register_hook(hook)


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_isolated_nonfinite_step_is_skipped_and_the_run_goes_on(make_config, tmp_path):
    config = make_config(**{"training.max_steps": 5})
    trainer = T5Trainer(config)
    _poison_gradients_from(trainer, 2, 2)
    changed = {}
    train_step = trainer.backend.train_step

    def watched(batch, step):
        before = [p.detach().clone() for p in trainer.backend.model.parameters()]
        result = train_step(batch, step)
        changed[step] = any(not torch.equal(a, p) for a, p in zip(before, trainer.backend.model.parameters()))
        # The next step starts without gradients, whatever this one did.
        assert all(p.grad is None for p in trainer.backend.model.parameters())
        return result

    trainer.backend.train_step = watched
    summary = trainer.train()
    trainer.close()
    assert summary["steps"] == 5
    assert changed == {0: True, 1: True, 2: False, 3: True, 4: True}
    records = _records(config.output_dir)
    assert [r["nonfinite"] for r in records] == [False, False, True, False, False]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1]
    # AdamW's own step count skips it too, as torch's GradScaler leaves it.
    adam_steps = {float(s["step"]) for s in trainer.backend.optimizer.state.values()}
    assert adam_steps == {4.0}
    # The final checkpoint carries the count, so a resumed run goes on counting.
    state = json.loads((checkpointing.step_path(config.output_dir, 5) / checkpointing.STATE_FILE).read_text())
    assert state["nonfinite"]["total"] == 1 and state["nonfinite"]["in_row"] == 0


def test_a_run_that_stays_nonfinite_stops_with_its_last_good_checkpoint(make_config, tmp_path):
    config = make_config(**{"training.max_steps": 20, "training.max_nonfinite_steps": 3, "output.save_steps": 2,
                            "output.save_total_limit": 1})
    trainer = T5Trainer(config)
    _poison_gradients_from(trainer, 2)  # the third step on
    with pytest.raises(UserError) as raised:
        trainer.train()
    trainer.close()
    message = str(raised.value)
    good = checkpointing.step_path(config.output_dir, 2)
    assert "\n" not in message
    # Stopped at the third non-finite step in a row, within max_nonfinite_steps + 1 steps.
    assert message.startswith("step 5: ") and "3 steps in a row" in message
    assert "--resume {}".format(good) in message and "learning rate" in message
    # Step 4's save fell in the streak: the checkpoint before it is the newest, kept by rotation.
    assert checkpointing.list_steps(config.output_dir) == [2]
    saved = checkpointing.inspect(good).model_tensors()
    weights = trainer.backend.model_state_dict()
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, weights[name]), name
    assert [r["step"] for r in _records(config.output_dir)] == [1, 2, 3, 4, 5]


def test_weights_that_are_not_finite_are_neither_checkpointed_nor_exported(make_config, tmp_path):
    config = make_config(**{"training.max_steps": 2, "output.save_steps": 2})
    trainer = T5Trainer(config)
    trainer.train()
    with torch.no_grad():
        next(trainer.backend.model.parameters()).fill_(float("inf"))
    for write in (lambda: trainer.save_checkpoint(tmp_path / "ckpt"), trainer.export_hf):
        with pytest.raises(UserError, match="weights are not finite.*step-2"):
            write()
    trainer.close()
    assert not (tmp_path / "ckpt").exists() and not (config.output_dir / "hf").exists()


def test_a_diverging_learning_rate_ends_the_command_with_one_line(tmp_path):
    """End to end: a learning rate that blows the weights up, so every later loss overflows."""
    out = tmp_path / "run"
    proc = run_cli(["train"] + ["--set=" + s for s in tiny_overrides(out, **{
        "training.learning_rate": 1e30, "training.max_nonfinite_steps": 2, "output.save_steps": 1,
        "validation.do_eval": "false"})])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ipu-t5: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    records = _records(out)
    first = min(r["step"] for r in records if r["nonfinite"])
    assert records[-1]["step"] <= first + 2
    newest = checkpointing.step_path(out, checkpointing.list_steps(out)[-1])
    assert "step {}: ".format(records[-1]["step"]) in errors[0] and str(newest) in errors[0]
    assert all(torch.isfinite(t).all() for t in checkpointing.inspect(newest).model_tensors().values())
    assert not (out / "hf").exists()



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weights_check_finds_one_bad_value_among_many(bad, dtype):
    from ipu_t5.backends.base import all_finite

    weights = [torch.randn(64, 32, dtype=dtype), torch.randn(7, dtype=dtype), torch.empty(0, dtype=dtype)]
    codes = torch.tensor([255, 0], dtype=torch.uint8)  # not numbers: never read as such
    assert all_finite(weights + [codes])
    weights[0][40, 3] = bad
    assert not all_finite(weights + [codes])
    assert all_finite([])
