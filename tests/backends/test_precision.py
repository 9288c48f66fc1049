"""bfloat16 autocast: the default per device, where it applies (training, generation, each
pipeline chunk), what stays float32 (weights, AdamW state, the loss, the export, the boundaries
between stages), exact resume under it, and validation's own setting."""
import json

import pytest
import torch
from safetensors import safe_open

from ipu_t5 import checkpointing
from ipu_t5.backends import precision
from ipu_t5.checkpointing.export import reload_and_predict
from ipu_t5.config import load_config
from ipu_t5.training.trainer import T5Trainer

from tests.conftest import losses, tiny_overrides

CPU = torch.device("cpu")


def _cpu_reports(monkeypatch, avx512_bf16, amx):
    """This torch's CPU probes answering as a CPU with (or without) the instructions would; None
    removes the probe, as on torch 2.0.1, which has neither."""
    for name, answer in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if answer is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda answer=answer: answer, raising=False)


@pytest.mark.core
@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None), (None, None, None)])
def test_the_cpu_default_follows_what_torch_reports(monkeypatch, avx512_bf16, amx, expected):
    _cpu_reports(monkeypatch, avx512_bf16, amx)
    assert precision.autocast_dtype(None, CPU) is expected
    # What the user sets wins either way.
    assert precision.autocast_dtype(True, CPU) is torch.bfloat16
    assert precision.autocast_dtype(False, CPU) is None


@pytest.mark.core
def test_a_torch_that_cannot_tell_says_in_one_line_that_it_runs_float32(monkeypatch):
    """The Poplar SDK's torch 2.0.1 has no probe for the CPU's bfloat16 instructions."""
    _cpu_reports(monkeypatch, None, None)
    line = precision.precision_phrase(None, None, None, CPU)
    assert line.startswith("fp32: torch {} cannot tell".format(torch.__version__)) and "\n" not in line
    assert "training.bf16=true" in line
    # Asked for float32, or for bfloat16, it says nothing more.
    assert precision.precision_phrase(None, None, False, CPU) == "fp32"
    assert precision.precision_phrase(torch.bfloat16, torch.bfloat16, True, CPU) == "bf16 autocast"


@pytest.mark.core
def test_validation_follows_training_unless_set():
    assert precision.eval_autocast_dtype(None, torch.bfloat16) is torch.bfloat16
    assert precision.eval_autocast_dtype(None, None) is None
    assert precision.eval_autocast_dtype(False, torch.bfloat16) is None
    assert precision.eval_autocast_dtype(True, None) is torch.bfloat16
    assert precision.precision_phrase(None, torch.bfloat16, False, CPU) == "fp32, validation in bf16 autocast"


def _dtypes_into(module: torch.nn.Module, seen: list):
    return module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))


@pytest.mark.core
def test_single_process_trains_in_bfloat16_and_keeps_float32_state(tmp_path, monkeypatch):
    """The products run in bfloat16; the loss, weights and AdamW moments stay float32."""
    import ipu_t5.backends.single as single

    config = load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **{
        "training.bf16": "true", "training.max_steps": 2, "validation.do_eval": "false"}))
    trainer = T5Trainer(config)
    seen, loss_dtypes = [], []
    _dtypes_into(trainer.backend.model.encoder.block[0].layer[1].DenseReluDense.wi_0, seen)
    real_loss = single.token_loss

    def recorded_loss(*args):
        loss = real_loss(*args)
        loss_dtypes.append(loss.dtype)
        return loss

    monkeypatch.setattr(single, "token_loss", recorded_loss)
    trainer.train()
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}
    assert loss_dtypes and set(loss_dtypes) == {torch.float32}
    assert {p.dtype for p in trainer.backend.model.parameters()} == {torch.float32}
    moments = [t for s in trainer.backend.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    trainer.close()


@pytest.mark.core
def test_bfloat16_training_resumes_bit_for_bit(tmp_path):
    values = {"training.bf16": "true", "training.max_steps": 6, "output.save_steps": 3, "validation.do_eval": "false"}

    def train(out, **more):
        trainer = T5Trainer(load_config("tiny", overrides=tiny_overrides(out, **dict(values, **more))))
        trainer.train()
        trainer.close()

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(reference)
    train(resumed, **{"training.max_steps": 3})
    train(resumed, **{"output.resume_from_checkpoint": "auto"})
    assert losses(resumed) == losses(reference)
    a = checkpointing.inspect(checkpointing.step_path(resumed, 6)).model_tensors()
    b = checkpointing.inspect(checkpointing.step_path(reference, 6)).model_tensors()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.core
def test_validation_in_bfloat16_exports_float32_and_reloads_alike(tmp_path):
    """validation.bf16=true: generation multiplies in bfloat16 after float32 training; the export
    stays float32, and plain transformers under the same autocast predicts what validation did."""
    out = tmp_path / "run"
    config = load_config("tiny", overrides=tiny_overrides(out, **{
        "training.bf16": "false", "validation.bf16": "true", "training.max_steps": 30}))
    trainer = T5Trainer(config)
    assert "validation in bf16 autocast" in trainer.backend.description
    trainer.train()
    seen = []
    _dtypes_into(trainer.backend.model.lm_head, seen)
    results = trainer.evaluate()
    assert results["precision"] == "bfloat16" and set(seen) == {(torch.float32, torch.bfloat16)}
    hf_dir = trainer.export_hf()
    trainer.close()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    rows = [json.loads(line) for line in open(out / "eval_predictions.jsonl")][:40]
    assert reload_and_predict(hf_dir, [r["prompt"] for r in rows], bf16=True) == [r["generated"] for r in rows]


def test_pipeline_chunks_autocast_inside_and_carry_float32_between_them():
    """Each chunk autocasts its own blocks (training and generation); what one chunk hands the next
    is float32, as the pipeline's buffers expect."""
    from ipu_t5.backends.torch_distributed.stages import build_chunks
    from ipu_t5.layout import plan_layout
    from ipu_t5.model_source import build_model, canonical_size

    model = build_model(load_config("tiny"), 512)
    plan = plan_layout(canonical_size("tiny"), 16, 2, 1, layers_per_stage=[2, 2])
    chunks = build_chunks(model, plan.stage_blocks, torch.bfloat16, None)
    seen = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name.endswith("wi_0"):
                _dtypes_into(module, seen)
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    carried = chunks[0](ids, torch.ones_like(ids), torch.tensor([[0, 5, 7], [0, 3, 3]]))
    assert {t.dtype for t in carried if t.is_floating_point()} == {torch.float32}
    assert set(seen) == {(torch.float32, torch.bfloat16)}
    logits = chunks[1](*carried)
    assert logits.dtype == torch.bfloat16  # the last chunk's output feeds the float32 loss only
    seen.clear()
    # Generation computes in validation's precision (here float32) on the same chunks.
    chunks[0].encode({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert seen and set(seen) == {(torch.float32, torch.float32)}


@pytest.mark.core
def test_bfloat16_validation_of_a_float16_run_is_refused():
    from ipu_t5.errors import UserError

    with pytest.raises(UserError, match="validation.bf16 and training.fp16"):
        load_config("tiny", overrides=["validation.bf16=true", "training.fp16=true"])
