"""LoRA on an nf4 base (`model.quantization`) under the torch.distributed pipeline (2 stages, 1F1B)
against one process: each stage quantises its own weights to the bytes one process holds (under 0.3
of their float32 bytes), the losses agree and fall, validation predicts alike, the merged float
export reloads in plain transformers and predicts what validation predicted, and a one-process
adapter checkpoint continues under the pipeline."""
import json

import pytest

from ipu_t5 import lora
from tests.backends.torch_distributed.pipeline_worker import STEPS
from tests.backends.torch_distributed.test_pipeline import (_assert_losses_equal, _assert_weights_equal, _one_process,
                                                          _run_worker)
from tests.test_quantization import needs_bitsandbytes

pytest.importorskip("peft", reason="LoRA needs peft (in setup.py; installed on both stacks)")
pytestmark = [pytest.mark.slow, needs_bitsandbytes]

# A learning rate at which the adapters lower the loss within the 5 steps.
NF4 = ["model.quantization=nf4", "training.learning_rate=3e-3"]


def test_nf4_lora_under_2_stages_matches_one_process_and_exports_float(tmp_path):
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.checkpointing.views import SafetensorsView, weight_files
    from safetensors.torch import load_file

    reference = _one_process(tmp_path / "single" / "run", lora=True, extra=NF4)
    found = _run_worker(tmp_path / "2x1", 2, 1, ["1F1B"], "--lora", "--quantization", "nf4", "--resume-from",
                        str(reference["checkpoint"]), "--extra", NF4[1])
    run, one = found["1F1B"], reference["five"]
    # Each stage holds its Linear weights in nf4, as one process holds them.
    assert len(run["base_bytes"]) == 2
    for held in run["base_bytes"]:
        assert 0 < held["held"] <= 0.3 * held["float32"], run["base_bytes"]
    assert sum(h["held"] for h in run["base_bytes"]) == one["base_bytes"][0]["held"]
    # Within 1e-5 of one process's loss at every step, as float32 LoRA under the pipeline (measured:
    # 1.0e-7, docs/torch-distributed.md).
    _assert_losses_equal(run["losses"], one["losses"][:STEPS])
    assert run["losses"][-1] < run["losses"][0]
    # The dequantised base bit for bit as one process's, and the adapters within rounding.
    _assert_weights_equal(run["weights"], one["weights"])
    assert run["optimized"] == sorted(n for n in one["weights"] if lora.is_adapter_key(n))
    assert run["predictions"] == one["predictions"]
    run_dir = tmp_path / "2x1" / "1F1B"
    # Each stage wrote its own shard of the float merged weights.
    names = list(SafetensorsView(weight_files(run_dir / "hf")))
    assert len(weight_files(run_dir / "hf")) == 2
    assert not [n for n in names if ".lora_" in n or ".base_layer." in n or "absmax" in n]
    rows = [json.loads(line) for line in open(run_dir / "eval_predictions.jsonl")]
    reloaded = reload_and_predict(run_dir / "hf", [r["prompt"] for r in rows])
    same = sum(r == row["generated"] for r, row in zip(reloaded, rows))
    assert same >= 0.95 * len(rows), (same, len(rows))
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(lora.is_adapter_key(k) for k in adapter)
    # The one-process adapter checkpoint continues under 2 stages as one process continued it.
    _assert_losses_equal(found["resumed"]["losses"], reference["eight"]["losses"][STEPS:])
    _assert_weights_equal(found["resumed"]["weights"], reference["eight"]["weights"])
