"""What makes validation fast: length-sorted batches of the validation batch size, generation that
stops when every sequence has ended, and the fused GELU computing what transformers computes."""
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

    from ipu_t5.fast_ops import fuse_gelu
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
