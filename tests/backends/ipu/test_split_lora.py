"""LoRA under split phases (ipu_t5/backends/ipu/split_lora.py): peft's adapters cut with their
layers compute the unsplit LoRA model, and an IPU run with split phases (through the poptorch
stand-in) trains, checkpoints and exports what one process does, under peft's names."""
import copy

import pytest
import torch

from ipu_t5 import lora
from ipu_t5.backends.ipu.model import hf_state_dict, join_slices, slice_counts
from ipu_t5.backends.ipu.split import split_t5
from ipu_t5.backends.ipu.split_lora import SplitAdapter
from ipu_t5.config.sections import PeftConfig
from ipu_t5.data.batching import GlobalBatch
from ipu_t5.errors import UserError

from . import poptorch_standin
from .test_backend import LORA, ipu_backend, lora_model, samples, tiny_config, train_export_and_checkpoint
from .test_phased import PHASED, only, single_backend
from .test_split import (batch, float16_split_against_unsplit, largest_relative_error, overall_relative_error, tiny_t5,
                         unsplit_loss_and_grads)
from tests.conftest import cpu_has_float16_matmul

pytestmark = pytest.mark.core
EVERY_LINEAR = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
# Every layer the split cuts by rows (q, k, v, wi_0, wi_1) and by columns (o, wo) adapted.
ALL_LORA = dict(LORA, **{"peft.target_modules": ",".join(EVERY_LINEAR)})


def adapted_t5(seed, dropout=0.0):
    """The tiny T5 with peft adapters on every linear layer, A and B drawn (peft starts B at zero,
    which would leave A without a gradient)."""
    model = tiny_t5(seed)
    lora.apply_lora(model, PeftConfig(method="lora", r=4, lora_alpha=8, lora_dropout=dropout,
                                      target_modules=list(EVERY_LINEAR)))
    draw_adapters(model, seed)
    return model


def draw_adapters(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lora.is_adapter_key(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def split_grads(model, inputs, parts, slices=None):
    split = split_t5(model, parts, slices or 2 * parts, half=False)
    loss = split(*inputs)
    loss.backward()
    return loss.item(), join_slices({n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def adapter_grads(grads):
    return {n: g for n, g in grads.items() if g is not None and lora.is_adapter_key(n)}


@pytest.mark.parametrize("parts", [2, 4])
def test_split_lora_is_the_unsplit_computation_exactly(parts):
    base = adapted_t5(0).double()
    inputs = batch()
    loss, grads = split_grads(copy.deepcopy(base), inputs, parts)
    unsplit, unsplit_grads = split_grads(copy.deepcopy(base), inputs, 1, 1)
    assert loss == pytest.approx(unsplit, rel=1e-12)
    assert set(grads) == set(unsplit_grads) == {n for n, p in base.named_parameters() if p.requires_grad}
    assert largest_relative_error(grads, unsplit_grads) < 1e-12


@pytest.mark.parametrize("parts", [2, 4])
def test_split_lora_computes_peft_loss_and_gradients_in_float32(parts):
    """Against Hugging Face's T5 with peft's adapters, float32: as the unadapted split is held
    (test_split): the loss within 1e-6 relative, the adapters' gradients within 1e-5 per tensor and
    no further from float64's than peft's own float32 gradients are."""
    base = adapted_t5(1)
    inputs = batch(1)
    loss, grads = split_grads(copy.deepcopy(base), inputs, parts)
    want, want_grads = unsplit_loss_and_grads(copy.deepcopy(base), inputs)
    _, exact = unsplit_loss_and_grads(copy.deepcopy(base).double(), inputs)
    want_grads, exact = adapter_grads(want_grads), adapter_grads(exact)
    assert loss == pytest.approx(want, rel=1e-6)
    assert set(grads) == set(want_grads) and len(grads) == 2 * 36  # A and B of 2 x 7 + 2 x 11 layers
    assert largest_relative_error(grads, want_grads) < 1e-5
    assert overall_relative_error(grads, exact) < 1.5 * overall_relative_error(want_grads, exact)


def test_split_lora_keeps_peft_names_scaling_and_dropout():
    base = adapted_t5(2, dropout=0.3)
    keys, original = list(base.state_dict()), copy.deepcopy(base.state_dict())
    model = copy.deepcopy(base)
    split_t5(model, 4, 8, half=False)
    attention = model.encoder.block[0].layer[0].SelfAttention
    q, o = attention.q, attention.o
    assert isinstance(q, SplitAdapter) and (q.scaling, q.dropout) == (2.0, 0.3)
    # Rows of B with q's output units, A whole; columns of A with o's inputs, B whole.
    assert q.lora_B["default"].slices[1].weight.shape == (32, 4) and q.lora_A["default"].weight.shape == (4, 128)
    assert o.lora_A["default"].slices[1].weight.shape == (4, 32) and o.lora_B["default"].weight.shape == (128, 4)
    counts = slice_counts(model)
    assert counts["encoder.block.0.layer.0.SelfAttention.q.base_layer.weight"] == 4
    assert counts["encoder.block.0.layer.0.SelfAttention.q.lora_B.default.weight"] == 4
    assert counts["decoder.block.1.layer.2.DenseReluDense.wo.lora_A.default.weight"] == 4
    state = hf_state_dict(model, keys)
    assert list(state) == keys and all(torch.equal(state[k], original[k]) for k in keys)
    # LoRA dropout acts in training only: in eval mode the split is peft's model exactly.
    ids, mask, decoder, _, _ = batch(2)
    with torch.no_grad():
        want = base.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.argmax(-1)
        assert torch.equal(model.eval().ipu_split(ids, mask, decoder), want)
        inputs = batch(2)
        model.ipu_split.eval()
        evaluated = model.ipu_split(*inputs)
        model.ipu_split.train()
        torch.manual_seed(0)
        trained = model.ipu_split(*inputs)
    assert trained != evaluated


@pytest.mark.skipif(not cpu_has_float16_matmul(), reason="the split runs on the CPU here, and this torch (the SDK's "
                                                           "2.0.1) has no float16 matmul there")
def test_split_lora_float16_follows_peft_in_float16():
    """The IPU's float16 numerics with adapters (wo's adapter output scaled as wo's own): the loss
    within float16's precision of peft's float16 model, every adapter gradient finite."""
    model, loss, want = float16_split_against_unsplit(adapted_t5(6), batch(6))
    assert loss == pytest.approx(want, rel=5e-3)
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if lora.is_adapter_key(n))


def test_the_split_refuses_an_adapter_it_cannot_cut():
    model = tiny_t5(3)
    lora.apply_lora(model, PeftConfig(method="lora", r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["q", "relative_attention_bias"]))
    with pytest.raises(UserError, match="adapts relative_attention_bias, which the IPU backend's split"):
        split_t5(model, 4, 8, half=False)


# ----- through the poptorch stand-in -----

@pytest.fixture
def standin(monkeypatch):
    return poptorch_standin.install(monkeypatch, ipus=4)


def test_lora_under_split_phases_trains_as_one_process_does(standin, tmp_path, monkeypatch):
    # Serial phases: each phase on all 4 IPUs, every adapter cut in 4 (test_phased covers parallel).
    phasing = "serial"
    only(monkeypatch, phasing)
    config = tiny_config(tmp_path, **dict(ALL_LORA, **PHASED))
    model = lora_model(config)
    draw_adapters(model, 4)
    before = copy.deepcopy(model.state_dict())
    adapters = {n for n in before if lora.is_adapter_key(n)}
    reference = single_backend(tmp_path, model)
    backend = ipu_backend(config, model)
    assert (backend.ipu_plan.execution, backend.ipu_plan.phasing) == ("phased", phasing)
    trainable = {n[len("t5."):] for n, p in backend.train_module.named_parameters() if p.requires_grad}
    assert join_slices(dict.fromkeys(trainable, torch.zeros(()))).keys() == adapters
    for step, seed in enumerate((1, 2)):
        batch_ = GlobalBatch(samples(16, seed))
        expected, got = reference.train_step(batch_, step), backend.train_step(batch_, step)
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    want, have = reference.model_state_dict(), backend.model_state_dict()
    assert list(have) == list(before)  # peft's names: ...q.base_layer.weight, ...q.lora_A.default.weight
    for name in before:
        if name in adapters:
            assert not torch.equal(have[name], before[name])
            torch.testing.assert_close(have[name], want[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(have[name], before[name]), "frozen weight {} changed".format(name)
    moments = backend.optimizer_state_dict()
    assert set(moments) == adapters
    wanted = reference.optimizer_state_dict()
    for name in adapters:
        torch.testing.assert_close(moments[name]["exp_avg"], wanted[name]["exp_avg"], rtol=1e-4, atol=1e-8)
    rows = samples(5, 3)
    assert backend.generate(rows, 4) == reference.generate(rows, 4)


def test_a_split_lora_run_checkpoints_and_exports_what_one_process_does(standin, tmp_path):
    from safetensors.torch import load_file

    def config(where, **values):
        settings = dict(ALL_LORA, **PHASED)
        settings.update({"training.max_steps": 2, "data.demo_train_samples": 200, "data.demo_eval_samples": 8,
                         "training.global_batch_size": 8})
        settings.update(values)
        return tiny_config(where, **settings)

    runs = {}
    for name, values in (("ipu", {}), ("single", {"layout.backend": "single", "layout.stages": 1})):
        where = tmp_path / name
        trainer, hf_dir, checkpoint, straight = train_export_and_checkpoint(config(where, **values), where, 3)
        runs[name] = (trainer, hf_dir, checkpoint, straight)
    assert runs["ipu"][0].backend.ipu_plan.execution == "phased"
    assert runs["ipu"][3] == pytest.approx(runs["single"][3], rel=1e-6)
    files = {"checkpoint": lambda run: run[2] / "model.safetensors",
             "export": lambda run: run[1] / "model.safetensors",
             "adapter": lambda run: run[1].parent / "adapter" / "adapter_model.safetensors"}
    for what, path in files.items():
        got, want = load_file(str(path(runs["ipu"]))), load_file(str(path(runs["single"])))
        assert list(got) == list(want), what
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7, msg="{} {}".format(what, name))
    assert all(lora.is_adapter_key(n) for n in load_file(str(files["checkpoint"](runs["ipu"]))))
