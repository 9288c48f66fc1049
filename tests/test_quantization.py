"""LoRA on a quantised base (`model.quantization`): bitsandbytes' nf4 and int8 layers on one process
(under the torch.distributed pipeline: tests/backends/torch_distributed/test_quantised_pipeline.py),
the memory plan counting them, a float merged export that predicts as validation did, and one line
wherever it cannot run."""
import json
import sys

import pytest
import torch

from ipu_t5 import quantization
from ipu_t5.config import load_config
from ipu_t5.errors import UserError

from .conftest import losses, tiny_overrides

pytest.importorskip("peft", reason="LoRA needs peft (in setup.py; installed on both stacks)")

STEPS = 16


def on_sdk_stack() -> bool:
    """The Poplar SDK's stack (torch 2.0.1), where bitsandbytes does not install."""
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 1)


def bitsandbytes_here() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


# Today's stack installs bitsandbytes with the test extra (setup.py), so there a missing one fails the
# tests that need it; only the SDK's stack, where it cannot install, skips them.
needs_bitsandbytes = pytest.mark.skipif(on_sdk_stack() and not bitsandbytes_here(),
                                        reason="bitsandbytes does not install on the Poplar SDK's torch 2.0.1")


def quantised_config(output_dir, kind="nf4", **values):
    settings = {"peft.method": "lora", "peft.r": 8, "peft.lora_alpha": 16, "model.quantization": kind,
                "data.demo_train_samples": 600, "data.demo_eval_samples": 60, "training.max_steps": STEPS,
                "training.global_batch_size": 16, "training.learning_rate": 3e-3, "training.logging_steps": 4}
    settings.update(values)
    return load_config("tiny", overrides=tiny_overrides(output_dir, **settings))


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """LoRA on an nf4 base of the tiny demo, trained, validated and exported."""
    from ipu_t5.training.trainer import T5Trainer

    out = tmp_path_factory.mktemp("nf4") / "run"
    trainer = T5Trainer(quantised_config(out))
    measured = quantization.weight_bytes(trainer.backend.model)
    trainer.train()
    trainer.evaluate()
    hf_dir = trainer.export_hf()
    predictions = [json.loads(line) for line in open(out / "eval_predictions.jsonl")]
    yield {"trainer": trainer, "bytes": measured, "hf_dir": hf_dir, "predictions": predictions, "out": out}
    trainer.close()


@needs_bitsandbytes
@pytest.mark.slow
def test_nf4_base_holds_under_a_third_of_its_float_bytes_and_the_loss_falls(nf4_run):
    import bitsandbytes as bnb

    model = nf4_run["trainer"].backend.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    measured = nf4_run["bytes"]
    assert measured["held"] <= 0.3 * measured["float32"], measured
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    loss = losses(nf4_run["out"])
    assert loss[max(loss)] < loss[min(loss)]


@needs_bitsandbytes
@pytest.mark.slow
def test_nf4_merged_export_is_float_and_predicts_as_validation_did(nf4_run):
    from safetensors.torch import load_file

    from ipu_t5.checkpointing.export import reload_and_predict

    weights = load_file(str(nf4_run["hf_dir"] / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert not any(".lora_" in k or "absmax" in k or "base_layer" in k for k in weights)
    predictions = nf4_run["predictions"]
    reloaded = reload_and_predict(nf4_run["hf_dir"], [p["prompt"] for p in predictions])
    same = sum(r == p["generated"] for r, p in zip(reloaded, predictions))
    assert same >= 0.95 * len(predictions), (same, len(predictions))
    # The adapter export as for a float base: peft's names, no quantised tensors.
    adapter = load_file(str(nf4_run["out"] / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)


@needs_bitsandbytes
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_dequantised_weights_are_the_float_base_within_the_quantisation_step(kind, tmp_path):
    """The export's weights (`FloatWeights`) under Hugging Face's (peft's) names: the float base
    the run started from, up to the rounding of `kind`."""
    from ipu_t5.model_source import build_model, run_source

    config = quantised_config(tmp_path, kind)
    base = build_model(config, 500).state_dict()
    model = run_source(config, 500).build()
    floats = quantization.FloatWeights(model)
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"  # transformers would keep it float
    assert type(model.get_submodule(name[:-len(".weight")])).__name__ in ("Linear4bit", "Linear8bitLt")
    q_name = "encoder.block.0.layer.0.SelfAttention.q.base_layer.weight"
    for ours, theirs in ((name, name), (q_name, q_name.replace(".base_layer", "")), ("lm_head.weight",) * 2):
        error = (floats[ours] - base[theirs]).abs().max() / base[theirs].abs().max()
        assert floats[ours].dtype == torch.float32 and floats[ours].shape == base[theirs].shape
        assert 0 < error < (0.02 if kind == "int8" else 0.2), (ours, float(error))
    assert not any("absmax" in k or k.endswith(".SCB") for k in floats)
    assert torch.equal(floats["shared.weight"], base["shared.weight"])


@needs_bitsandbytes
@pytest.mark.parametrize("kind, tolerance", [("nf4", 1e-5), ("int8", 0.05)])
def test_the_quantised_model_computes_what_its_dequantised_export_computes(kind, tolerance, tmp_path):
    """nf4 computes with the dequantised weights themselves (T5's feed-forward included, which casts
    its input to `wo`'s dtype); LLM.int8 also rounds the activations, so only closely."""
    from ipu_t5 import lora
    from ipu_t5.model_source import run_source
    from ipu_t5.models import with_weights

    config = quantised_config(tmp_path, kind, **{"model.dropout_rate": 0.0, "peft.lora_dropout": 0.0})
    model = run_source(config, 500).build()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: give the adapters something to merge
                param.normal_(0, 0.05)
    export = with_weights(model.config, lora.merged_state(quantization.FloatWeights(model), config.peft)).eval()
    ids, decoder_ids = torch.randint(2, 500, (4, 24)), torch.randint(2, 500, (4, 6))
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            ours = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
            theirs = export(input_ids=ids, decoder_input_ids=decoder_ids).logits
        assert float((ours - theirs).abs().max()) <= tolerance * float(theirs.abs().max()), (kind, train)


@needs_bitsandbytes
def test_the_memory_plan_counts_the_weights_as_the_module_holds_them(tmp_path):
    from ipu_t5.backends.torch_distributed.memory import plan_memory
    from ipu_t5.model_source import run_source

    config = quantised_config(tmp_path, "nf4")
    planned = plan_memory(config, 64, 8).ranks[0]
    # The plan's tiny entry, at its vocabulary, as the backend builds it.
    model = run_source(config, 512).build()
    measured = quantization.weight_bytes(model)
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # Within 10%: the plan leaves out bitsandbytes' small per-tensor state (quant_map, ...).
    assert abs(planned.weights - adapters - measured["held"]) <= 0.1 * measured["held"], (planned.weights, measured)
    float_plan = plan_memory(quantised_config(tmp_path, "none"), 64, 8).ranks[0]
    assert planned.weights < 0.4 * float_plan.weights


@needs_bitsandbytes
def test_each_pipeline_stage_quantises_its_own_weights_as_one_process_and_the_plan_counts_them(tmp_path):
    """A stage of the torch backend builds its chunks from the quantised frame, quantising each
    weight as it is read: together they hold one process's bytes, bit for bit, and each the
    memory plan's weights for its stage."""
    from ipu_t5.backends.torch_distributed.memory import plan_memory
    from ipu_t5.backends.torch_distributed.stages import build_chunks
    from ipu_t5.model_source import run_source

    config = quantised_config(tmp_path, "nf4", **{"layout.backend": "torch", "layout.stages": 2})
    plan = plan_memory(config, 64, 8)
    source = run_source(config, 512)
    whole = source.build().state_dict()
    bits = {}
    for stage, blocks in enumerate(plan.layout.stage_blocks):
        chunk = source.materialise(build_chunks(source.meta_model(quantised=True), [blocks])[0])
        measured = quantization.weight_bytes(chunk)
        adapters = sum(p.numel() * 4 for p in chunk.parameters() if p.requires_grad)
        assert measured["held"] <= 0.3 * measured["float32"], (stage, measured)
        assert abs(plan.ranks[stage].weights - adapters - measured["held"]) <= 0.1 * measured["held"], stage
        bits.update({k: v.view(torch.uint8) for k, v in chunk.state_dict().items() if v.dtype == torch.float32})
    assert bits and all(torch.equal(v, whole[k].view(torch.uint8)) for k, v in bits.items())


@pytest.mark.core
def test_quantisation_without_lora_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="model.quantization=nf4 freezes the base") as err:
        quantised_config(tmp_path, **{"peft.method": "none"})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model.quantization must be one of none, int8, nf4"):
        quantised_config(tmp_path, "fp8")


@pytest.mark.core
def test_the_ipu_backend_refuses_a_quantised_base_in_one_line(tmp_path):
    from ipu_t5.backends.ipu.backend import IpuBackend
    from ipu_t5.layout import plan_from_config

    config = quantised_config(tmp_path)
    with pytest.raises(UserError, match="model.quantization=nf4 runs on the single-process and torch backends only"):
        IpuBackend(config, plan_from_config(config))


@needs_bitsandbytes
def test_the_torch_backend_refuses_fsdp2_over_a_quantised_base_in_one_line(tmp_path, monkeypatch):
    """Before it joins a process group: FSDP2 cannot shard bitsandbytes' weights, and without
    bitsandbytes nothing quantises (the pipeline itself: tests/backends/torch_distributed/test_quantised_pipeline.py)."""
    from ipu_t5.backends.torch_distributed.backend import TorchPipelineBackend
    from ipu_t5.layout import plan_from_config

    config = quantised_config(tmp_path, **{"layout.backend": "torch", "layout.replicas": 2,
                                           "layout.data_parallel": "fsdp"})
    with pytest.raises(UserError, match="model.quantization=nf4 does not shard under FSDP2: use "
                                        "layout.data_parallel=ddp") as err:
        TorchPipelineBackend(config, plan_from_config(config))
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="model.quantization=nf4 needs bitsandbytes"):
        TorchPipelineBackend(config, plan_from_config(config))


@pytest.mark.core
def test_without_bitsandbytes_the_single_backend_refuses_in_one_line(tmp_path, monkeypatch):
    from ipu_t5.backends.single import SingleProcessBackend
    from ipu_t5.layout import plan_from_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on the SDK's stack: the import fails
    config = quantised_config(tmp_path)
    with pytest.raises(UserError, match="model.quantization=nf4 needs bitsandbytes"):
        SingleProcessBackend(config, plan_from_config(config))


@needs_bitsandbytes
@pytest.mark.slow
def test_a_quantised_lora_run_resumes_exactly_from_its_adapter_checkpoint(tmp_path):
    """The base is quantised again from the same float weights; the checkpoint holds the adapters."""
    from ipu_t5 import checkpointing, lora
    from ipu_t5.training.trainer import T5Trainer

    def run(out, steps, **extra):
        values = {"training.max_steps": steps, "output.save_steps": 3, "validation.do_eval": "false",
                  "data.demo_train_samples": 200}
        values.update(extra)
        T5Trainer(quantised_config(out, **values)).train()
        return list(losses(out).values())

    straight = run(tmp_path / "straight", 6)
    first = run(tmp_path / "stopped", 3)
    resumed = run(tmp_path / "stopped", 6, **{"output.resume_from_checkpoint": "auto"})
    assert first == straight[:3] and resumed == straight
    final = [checkpointing.inspect(checkpointing.step_path(tmp_path / name, 6)).model_tensors()
             for name in ("straight", "stopped")]
    assert set(final[0]) == set(final[1]) and all(lora.is_adapter_key(k) for k in final[0])
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
