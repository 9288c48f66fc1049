"""What makes validation fast: length-sorted batches of the validation batch size, generation that
stops when every sequence has ended, the fused GELU computing what transformers computes, and
inference computed in place, bit for bit as transformers computes it."""
import pytest
import torch

pytestmark = pytest.mark.core


def test_validation_batches_are_sorted_by_length(trained, monkeypatch):
    trainer = trained["trainer"]
    seen = []
    inner = trainer.backend.generate

    def spy(samples, max_new_tokens):
        seen.append([len(s["input_ids"]) for s in samples])
        return inner(samples, max_new_tokens)

    monkeypatch.setattr(trainer.backend, "generate", spy)
    monkeypatch.setattr(trainer.eval_config, "per_device_eval_batch_size", 32)
    result = trainer.evaluate()
    assert result["accuracy"] == trained["results"]["accuracy"]
    assert [len(b) for b in seen] == [32] * 4 + [150 - 128]
    # Longest first, and each batch's prompts no longer than the previous batch's shortest.
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True)


def test_generation_stops_once_every_sequence_has_ended(trained):
    backend = trained["trainer"].backend
    rows = trained["trainer"].eval_features.select(range(16)).to_list()
    steps = []
    handle = backend.model.decoder.register_forward_pre_hook(lambda module, args: steps.append(1))
    try:
        generated = backend.generate(rows, max_new_tokens=40)
    finally:
        handle.remove()
    longest = max(len(ids) for ids in generated)
    assert longest < 10  # the trained model answers with a label, then ends
    # One decoder pass per generated token and one for the end-of-sequence token, not 40.
    assert len(steps) <= longest + 1


def test_fused_gelu_trains_the_same_function_and_evaluates_exactly_as_transformers():
    from transformers import T5Config, T5ForConditionalGeneration

    from ipu_t5.backends.fast_ops import fuse_gelu
    from ipu_t5.models import SIZES

    torch.manual_seed(0)
    reference = T5ForConditionalGeneration(T5Config(**SIZES["tiny"].t5_config_kwargs()))
    fused = T5ForConditionalGeneration(reference.config)
    fused.load_state_dict(reference.state_dict())
    assert fuse_gelu(fused) == 4  # one per encoder and decoder block
    assert fused.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(3, 500, (2, 12))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits

    # Eval mode (validation, generation, export parity): bit for bit what transformers computes.
    assert torch.equal(logits(reference.eval()), logits(fused.eval()))
    # Training mode: the same formula in one kernel, equal up to float32 rounding (dropout is 0).
    reference.train()
    fused.train()
    torch.testing.assert_close(logits(fused), logits(reference), rtol=1e-4, atol=1e-4)
    assert any(type(m).__name__ == "TrainingFusedGELU" for m in fused.modules())


def _tiny_pair():
    """A tiny Flan-T5 and a copy of it with the fused GELU and in-place inference."""
    from transformers import T5Config, T5ForConditionalGeneration

    from ipu_t5.backends.fast_ops import compute_inference_in_place, fuse_gelu
    from ipu_t5.models import SIZES

    torch.manual_seed(0)
    reference = T5ForConditionalGeneration(T5Config(**SIZES["tiny"].t5_config_kwargs()))
    fast = T5ForConditionalGeneration(reference.config)
    fast.load_state_dict(reference.state_dict())
    fuse_gelu(fast)
    # 4 feed-forwards; RMS norms: 2 per encoder block, 3 per decoder block, 1 after each stack.
    assert compute_inference_in_place(fast) == 4 + (2 * 2 + 1) + (2 * 3 + 1)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    return reference, fast


def test_gelu_new_consuming_is_gelu_new_bit_for_bit():
    from transformers.activations import NewGELUActivation

    from ipu_t5.backends.fast_ops import gelu_new_consuming

    x = torch.cat([torch.randn(4096) * scale for scale in (0.01, 1.0, 10.0, 1000.0)])
    assert torch.equal(gelu_new_consuming(x.clone()), NewGELUActivation()(x))


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16-autocast"])
def test_inference_in_place_generates_bit_for_bit_what_transformers_generates(bf16):
    reference, fast = _tiny_pair()
    reference.eval()
    fast.eval()
    ids = torch.randint(3, 500, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    # Under autocast the element-wise steps run in the same dtypes, in the same order, as transformers'.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        kwargs = {"input_ids": ids, "attention_mask": mask}
        assert torch.equal(fast(decoder_input_ids=ids[:, :5], **kwargs).logits,
                           reference(decoder_input_ids=ids[:, :5], **kwargs).logits)
        generated = fast.generate(max_new_tokens=6, do_sample=False, **kwargs)
        assert torch.equal(generated, reference.generate(max_new_tokens=6, do_sample=False, **kwargs))


def test_inference_in_place_leaves_training_gradients_alone():
    from ipu_t5.backends.fast_ops import fuse_gelu

    reference, fast = _tiny_pair()
    fuse_gelu(reference)  # the same fused training GELU, without in-place inference
    ids = torch.randint(3, 500, (2, 11))
    for model in (reference, fast):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(input_ids=ids, labels=ids[:, :4].clone()).loss.backward()
    for (name, ours), theirs in zip(fast.named_parameters(), reference.parameters()):
        assert torch.equal(ours.grad, theirs.grad), name
