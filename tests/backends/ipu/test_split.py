"""Flan-T5 split over the IPUs of a phase (ipu_t5/backends/ipu/split.py): the same function as the
unsplit T5, the same loss and gradients, and weights that keep their Hugging Face names."""
import copy

import pytest
import torch

from ipu_t5.backends.ipu.model import hf_state_dict, join_slices, load_hf_state_dict, slice_counts, split_like_slices
from ipu_t5.backends.ipu.split import split_t5
from ipu_t5.backends.optim import token_loss
from ipu_t5.models import SIZES

from tests.conftest import cpu_has_float16_matmul

pytestmark = pytest.mark.core


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    from ipu_t5.compat import untie_lm_head

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**SIZES["tiny"].t5_config_kwargs()))
    untie_lm_head(model)
    return model


def batch(seed=0):
    """Prompts with padding, targets with ignored positions, and the step's target-token count."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (4, 19), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 12:], mask[2, 15:] = 0, 0
    decoder = torch.randint(3, 512, (4, 6), generator=generator)
    labels = torch.randint(3, 512, (4, 6), generator=generator)
    labels[1, 4:] = -100
    return ids, mask, decoder, labels, torch.full((4,), float((labels != -100).sum()))


def unsplit_loss_and_grads(model, inputs):
    ids, mask, decoder, labels, count = inputs
    loss = token_loss(model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits, labels, count[0])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def split_loss_and_grads(model, inputs, parts, slices=None):
    split = split_t5(model, parts, slices or 2 * parts, half=False)
    loss = split(*inputs)
    loss.backward()
    return loss.item(), join_slices({n: p.grad for n, p in model.named_parameters()})


def largest_relative_error(got, want):
    return max(((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want)


def overall_relative_error(got, want):
    error = sum((got[n].double() - want[n].double()).norm() ** 2 for n in want)
    return (error / sum(want[n].double().norm() ** 2 for n in want)).sqrt().item()


@pytest.mark.parametrize("parts", [2, 4])
def test_split_is_the_unsplit_computation_exactly(parts):
    """In float64 the split's loss and gradients equal the unsplit computation's (one part, one
    slice: the same modules with nothing cut) to rounding: cutting by heads, inner units and
    vocabulary and adding partial sums by column chunks changes nothing but summation order."""
    base = tiny_t5().double()
    inputs = batch()
    loss, grads = split_loss_and_grads(copy.deepcopy(base), inputs, parts)
    unsplit, unsplit_grads = split_loss_and_grads(copy.deepcopy(base), inputs, 1, 1)
    assert loss == pytest.approx(unsplit, rel=1e-12)
    assert set(grads) == set(unsplit_grads)
    assert largest_relative_error(grads, unsplit_grads) < 1e-12


@pytest.mark.parametrize("parts", [2, 4])
def test_split_computes_the_hugging_face_loss_and_gradients_in_float32(parts):
    """Against Hugging Face's own T5 in float32: the loss within 1e-6 relative; the gradients within
    1e-5 relative per tensor, and no further from the float64 gradients than the unsplit float32
    gradients are (float32 itself is about 1e-6 from exact for this model: that is the floor)."""
    base = tiny_t5(1)
    inputs = batch(1)
    loss, grads = split_loss_and_grads(copy.deepcopy(base), inputs, parts)
    want, want_grads = unsplit_loss_and_grads(copy.deepcopy(base), inputs)
    _, exact_grads = unsplit_loss_and_grads(copy.deepcopy(base).double(), inputs)
    assert loss == pytest.approx(want, rel=1e-6)
    assert set(grads) == set(want_grads)
    assert largest_relative_error(grads, want_grads) < 1e-5
    assert overall_relative_error(grads, exact_grads) < 1.5 * overall_relative_error(want_grads, exact_grads)


def test_split_greedy_tokens_are_the_unsplit_argmax():
    base = tiny_t5(2)
    ids, mask, decoder, _, _ = batch(2)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.argmax(-1)
        got = split_t5(copy.deepcopy(base), 4, 8, half=False)(ids, mask, decoder)
    assert torch.equal(got, want)


def test_split_weights_keep_hugging_face_names_and_shapes():
    base = tiny_t5(3)
    keys, original = list(base.state_dict()), copy.deepcopy(base.state_dict())
    model = copy.deepcopy(base)
    split_t5(model, 4, 8, half=False)
    # Every weight is cut: q, k, v, wi_0, wi_1 by rows, o, wo and the position bias by columns.
    counts = slice_counts(model)
    assert counts["encoder.block.0.layer.0.SelfAttention.q.weight"] == 4 and counts["lm_head.weight"] == 8
    assert model.encoder.block[0].layer[0].SelfAttention.o.slices[1].weight.shape == (128, 32)
    assert model.decoder.block[1].layer[2].DenseReluDense.wi_1.slices[3].weight.shape == (64, 128)
    state = hf_state_dict(model, keys)
    assert list(state) == keys
    assert all(torch.equal(state[k], original[k]) for k in keys)
    # Loaded by name into a model cut another way, and back out unchanged.
    other = tiny_t5(4)
    split_t5(other, 2, 2, half=False)
    load_hf_state_dict(other, state)
    assert all(torch.equal(hf_state_dict(other, keys)[k], original[k]) for k in keys)
    # Optimizer state (a tensor per weight, a step count) splits and joins the same way.
    moments = {k: torch.randn_like(v) for k, v in original.items() if ".embed_tokens." not in k}
    parts = {}
    for name, tensor in moments.items():
        parts.update(split_like_slices(name, tensor, counts))
    assert "decoder.block.0.layer.1.EncDecAttention.o.slices.3.weight" in parts
    joined = join_slices(parts)
    assert set(joined) == set(moments) and all(torch.equal(joined[k], v) for k, v in moments.items())
    steps = split_like_slices("lm_head.weight", torch.tensor(3.0), counts)
    assert len(steps) == 8 and join_slices(steps)["lm_head.weight"] == 3.0


@pytest.mark.skipif(not cpu_has_float16_matmul(), reason="the split runs on the CPU here, and this torch (the SDK's "
                                                           "2.0.1) has no float16 matmul there")
def test_split_float16_numerics_follow_the_unsplit_ones():
    """float16 as on the IPU: a float32 stream, the feed-forward output at 1/8 scale, partial sums
    in float32. The loss stays within float16's precision of the unsplit float16 model's."""
    model, loss, want = float16_split_against_unsplit(tiny_t5(5), batch(5))
    assert loss == pytest.approx(want, rel=5e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def float16_split_against_unsplit(base, inputs):
    """`base` split over 4 IPUs in float16 after a backward, its loss, and the unsplit float16
    model's loss, both with the IPU's float16 numerics."""
    from ipu_t5.backends.ipu.fp16 import use_float16_numerics

    unsplit = copy.deepcopy(base)
    use_float16_numerics(unsplit)
    want, _ = unsplit_loss_and_grads(unsplit.half(), inputs)
    model = copy.deepcopy(base)
    split = split_t5(model, 4, 8, half=True)
    model.half()
    loss = split(*inputs)
    loss.backward()
    return model, loss.item(), want
