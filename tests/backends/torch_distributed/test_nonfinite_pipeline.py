"""Non-finite steps under the pipeline: the loss (on the last stage) and the gradient norm (over the
stages) are global before the decision, so every process skips alike and stops with one line."""
import json

import pytest

from ipu_t5 import checkpointing

from tests.conftest import run_cli, tiny_overrides


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_stage_of_a_pipeline_skips_and_stops_together(tmp_path):
    """Under --stages 2 the loss lives on the last stage and each stage holds half the gradients:
    both are all-reduced before the decision, so both processes skip the same steps and stop with
    the same line, which the launcher reports once."""
    out = tmp_path / "run"
    proc = run_cli(["train", "--stages", "2"] + ["--set=" + s for s in tiny_overrides(out, **{
        "training.learning_rate": 1e30, "training.max_nonfinite_steps": 2, "output.save_steps": 1,
        "validation.do_eval": "false", "data.demo_train_samples": 200, "training.global_batch_size": 8})],
        env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ipu-t5: error:" in line]
    assert len(errors) == 1 and "not finite in 2 steps in a row" in errors[0], proc.stderr[-3000:]
    records = _records(out)
    first = min(r["step"] for r in records if r["nonfinite"])
    assert [r["step"] for r in records][-1] == first + 1
    newest = checkpointing.step_path(out, checkpointing.list_steps(out)[-1])
    assert str(newest) in errors[0]
