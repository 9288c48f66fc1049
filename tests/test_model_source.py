"""Model sources: per-name random initialisation, pretrained weights read tensor by tensor from one
safetensors file or a sharded set (a hub snapshot too), and the refusals of weights that cannot be
used. Stage-local construction under torch.distributed is in
tests/backends/torch_distributed/test_stage_local.py."""
import pytest
import torch

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.initialise import distribution, seed_of
from ipu_t5.model_source import ModelSource, pretrained_source, run_source
from ipu_t5.models import SIZES

pytestmark = pytest.mark.core


def _tiny_source(seed=42, lora=False):
    overrides = ["training.seed={}".format(seed)] + (["peft.method=lora", "peft.r=4"] if lora else [])
    return run_source(load_config("tiny", overrides=overrides), 512)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _block(frame, index):
    """Decoder block `index` of `frame` in a module of its own, under its Hugging Face names (as a
    pipeline stage holds it)."""
    part = torch.nn.Module()
    part.decoder = torch.nn.Module()
    part.decoder.block = torch.nn.ModuleDict({str(index): frame.decoder.block[index]})
    return part


def test_random_weights_are_a_function_of_seed_and_name_alone():
    """A part built alone (as a pipeline stage builds it) holds what the whole model holds, whatever
    was drawn before; another seed draws other weights."""
    source = _tiny_source()
    whole = _state(source.build())
    torch.manual_seed(123)
    torch.randn(1000)
    frame = source.meta_model()
    part = source.materialise(_block(frame, 1))
    for name, param in part.named_parameters():
        assert torch.equal(param, whole[name]), name
    other = _state(_tiny_source(seed=7).build())
    assert not torch.equal(other["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           whole["encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert seed_of(42, "lm_head.weight") != seed_of(42, "shared.weight")


def test_random_weights_follow_flan_t5_initialisation():
    model = _tiny_source().build()
    config = model.config
    d, kv, heads, ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    expected = {
        "shared.weight": 1.0, "lm_head.weight": d ** -0.5,
        "encoder.block.0.layer.0.SelfAttention.q.weight": (d * kv) ** -0.5,
        "encoder.block.0.layer.0.SelfAttention.k.weight": d ** -0.5,
        "decoder.block.1.layer.1.EncDecAttention.o.weight": (heads * kv) ** -0.5,
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": d ** -0.5,
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight": d ** -0.5,
        "encoder.block.1.layer.1.DenseReluDense.wo.weight": ff ** -0.5,
    }
    state = dict(model.named_parameters())
    for name, std in expected.items():
        # Within 4 standard errors of the estimates.
        count = state[name].numel()
        assert abs(state[name].std().item() / std - 1) < 4 / (2 * count) ** 0.5, name
        assert abs(state[name].mean().item()) < 4 * std / count ** 0.5, name
    assert torch.equal(state["encoder.final_layer_norm.weight"], torch.ones(d))
    # The tied input embeddings stay one tensor; the LM head is its own.
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    assert model.lm_head.weight is not model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == SIZES["tiny"].total_params()
    with pytest.raises(ValueError, match="no initialisation is defined for parameter 'encoder.extra.weight'"):
        distribution("encoder.extra.weight", config)


def test_lora_adapters_are_drawn_by_name_and_the_base_is_the_plain_model():
    plain = _state(_tiny_source().build())
    adapted = _tiny_source(lora=True).build()
    names = dict(adapted.named_parameters())
    q = "encoder.block.0.layer.0.SelfAttention.q"
    assert torch.equal(names[q + ".base_layer.weight"], plain[q + ".weight"])
    a, b = names[q + ".lora_A.default.weight"], names[q + ".lora_B.default.weight"]
    bound = 1 / a.shape[1] ** 0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and not b.any()
    assert torch.equal(a, _tiny_source(lora=True).build().get_parameter(q + ".lora_A.default.weight"))
    assert not names[q + ".base_layer.weight"].requires_grad and a.requires_grad


def _save(model, directory, **kwargs):
    model.save_pretrained(str(directory), **kwargs)
    return directory


@pytest.fixture(scope="module")
def reference_model():
    return _tiny_source().build()


def test_pretrained_weights_from_a_sharded_set_are_read_one_by_one(reference_model, tmp_path, monkeypatch):
    from ipu_t5.checkpointing import views

    directory = _save(reference_model, tmp_path / "sharded", max_shard_size="200KB")
    assert (directory / "model.safetensors.index.json").is_file()
    read = []
    original = views.SafetensorsView.__getitem__

    def recording(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(views.SafetensorsView, "__getitem__", recording)
    source = pretrained_source(str(directory), 512)
    part = source.materialise(_block(source.meta_model(), 0))
    assert sorted(read) == sorted(n for n, _ in part.named_parameters())
    for name, param in part.named_parameters():
        assert torch.equal(param, reference_model.get_parameter(name))
    whole = source.build()
    for name, param in reference_model.named_parameters():
        assert torch.equal(whole.get_parameter(name), param), name
    assert whole.encoder.embed_tokens.weight is whole.shared.weight


def test_weights_that_cannot_be_used_are_refused_in_one_line(reference_model, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _save(reference_model, tmp_path / "one")
    state = load_file(str(directory / "model.safetensors"))
    cases = {
        "headless": ({k: v for k, v in state.items() if k != "lm_head.weight"}, "ties its LM head to the embedding"),
        "blockless": ({k: v for k, v in state.items() if not k.startswith("decoder.block.1.")},
                      "do not fit its config.json: it lacks 14 of the model's weights"),
        "misshapen": (dict(state, **{"encoder.final_layer_norm.weight": torch.ones(3)}),
                      "holds encoder.final_layer_norm.weight of shape (3,) where its config.json says (128,)"),
    }
    for name, (tensors, message) in cases.items():
        broken = tmp_path / name
        broken.mkdir()
        (broken / "config.json").write_text((directory / "config.json").read_text())
        save_file(tensors, str(broken / "model.safetensors"))
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pretrained_source(str(broken), 512)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(UserError, match="holds no safetensors weights .*save_pretrained"):
        pretrained_source(str(tmp_path / "bin"), 512)
    with pytest.raises(UserError, match="the tokenizer has 600 tokens but .* embeds only 512"):
        pretrained_source(str(directory), 600)
    with pytest.raises(UserError, match="holds no config.json"):
        pretrained_source(str(tmp_path), 512)


def test_a_hub_id_is_read_from_the_cache_offline(reference_model, tmp_path, monkeypatch):
    """What a node's processes find after one of them downloaded: the hub cache's snapshot."""
    import huggingface_hub

    cache = tmp_path / "hub"
    commit = "0" * 40
    snapshot = cache / "models--someone--tiny-t5" / "snapshots" / commit
    _save(reference_model, snapshot)
    (cache / "models--someone--tiny-t5" / "refs").mkdir()
    (cache / "models--someone--tiny-t5" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = pretrained_source("someone/tiny-t5", 512)
    assert torch.equal(source.weights["lm_head.weight"], reference_model.lm_head.weight)
    with pytest.raises(UserError, match="could not load weights 'someone/absent'.*download them first"):
        pretrained_source("someone/absent", 512)


def test_a_callers_module_is_taken_as_it_is(reference_model):
    source = ModelSource.of(reference_model)
    assert source.build() is reference_model and source.meta_model() is reference_model
