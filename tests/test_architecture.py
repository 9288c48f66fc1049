"""The architecture a run builds comes from its weights' config.json: a checkpoint of a shape in no
registry entry, or of another size than `model.name`, trains as itself in one process and under the
pipeline alike, and the layout and memory plans cut what the weights describe."""
import json

import pytest

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.layout import plan_from_config
from ipu_t5.models import SIZES, model_size, size_from_hf_config, size_note

from .conftest import losses, random_export, run_cli, tiny_overrides

# A Flan-T5 of a shape no registry entry has: another width, head count and encoder/decoder depths.
CUSTOM = dict(d_model=96, d_ff=160, num_heads=3, d_kv=32, num_layers=3, num_decoder_layers=2)


@pytest.fixture(scope="module")
def custom_export(tmp_path_factory):
    """A random-weight export of the CUSTOM shape with the demo tokenizer."""
    config = load_config("tiny", overrides=tiny_overrides(tmp_path_factory.mktemp("tok") / "run"))
    return random_export(config, tmp_path_factory.mktemp("custom") / "hf", **CUSTOM)


@pytest.mark.core
def test_a_config_of_a_registered_size_is_that_size_and_any_other_is_custom():
    assert size_from_hf_config(SIZES["small"].t5_config_kwargs()) is SIZES["small"]
    # T5Config's defaults fill what a config.json leaves out (the decoder depth is the encoder's).
    data = {k: v for k, v in SIZES["base"].t5_config_kwargs().items() if k != "num_decoder_layers"}
    assert size_from_hf_config(data) is SIZES["base"]
    custom = size_from_hf_config(dict(SIZES["tiny"].t5_config_kwargs(), **CUSTOM))
    assert custom.name == "custom" and custom.hub_id is None
    assert (custom.d_model, custom.d_ff, custom.num_heads, custom.d_kv) == (96, 160, 3, 32)
    assert custom.block_names == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]
    with pytest.raises(UserError, match="names a 'bart' model, not a T5"):
        size_from_hf_config({"model_type": "bart", "d_model": 96})


@pytest.mark.core
def test_the_layout_cuts_the_weights_architecture_not_the_named_size(custom_export, tmp_path):
    config = load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **{
        "model.pretrained": str(custom_export), "layout.stages": 2}))
    size = model_size(config)
    assert size.name == "custom" and size.num_layers == 3 and size.num_decoder_layers == 2
    plan = plan_from_config(config, 64, 4)
    assert plan.size == size
    # Every block of the weights is on some stage, and none that the tiny entry would name only.
    cut = [b for stage in plan.stage_blocks for b in stage if b.startswith(("encoder.", "decoder.")) and
           b.split(".")[1].isdigit()]
    assert sorted(cut) == sorted(size.block_names)
    note = size_note(config, size)
    assert "model.name is 'tiny'" in note and "d_model 96" in note and "3+2 blocks" in note
    # Weights drawn at random: the registry's entry, and nothing to say.
    drawn = load_config("tiny", overrides=tiny_overrides(tmp_path / "drawn"))
    assert model_size(drawn) is SIZES["tiny"] and size_note(drawn, SIZES["tiny"]) is None
    # The demo's export: the tiny entry with its tokenizer's smaller vocabulary, nothing to say either.
    exported = dict(SIZES["tiny"].t5_config_kwargs(), vocab_size=238, model_type="t5")
    size = size_from_hf_config(exported)
    assert size.name == "tiny" and size.vocab_size == 238 and size_note(drawn, size) is None


@pytest.mark.core
def test_a_model_object_or_config_given_to_the_trainer_sets_the_size(custom_export, tmp_path):
    from transformers import T5Config

    config = load_config("tiny", overrides=tiny_overrides(tmp_path / "run"))
    assert model_size(config, T5Config.from_pretrained(str(custom_export))).d_model == 96
    assert model_size(config, str(custom_export)).num_layers == 3


@pytest.mark.core
def test_an_unreadable_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    config = load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **{"model.pretrained": str(tmp_path)}))
    with pytest.raises(UserError, match="config.json is valid JSON"):
        model_size(config)


def _train(custom_export, out, *flags):
    settings = tiny_overrides(out, **{"training.max_steps": 6, "training.global_batch_size": 8,
                                      "data.demo_train_samples": 400, "data.demo_eval_samples": 24,
                                      "training.logging_steps": 1})
    args = ["train", "--pretrained", str(custom_export)] + list(flags)
    for item in settings:
        args += ["--set", item]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_shape_in_no_registry_entry_trains_alike_in_one_process_and_under_the_pipeline(custom_export, tmp_path):
    one = _train(custom_export, tmp_path / "one")
    piped = _train(custom_export, tmp_path / "piped", "--stages", "2")
    # --model naming another size: followed by the weights, with one line saying so, on every backend.
    named = _train(custom_export, tmp_path / "named", "--stages", "2", "--model", "small", "--set", "data.source=demo",
                   "--set", "training.learning_rate=1e-3", "--set", "training.warmup_steps=0",
                   "--set", "training.lr_scheduler_type=constant", "--set", "training.weight_decay=0",
                   # small's preset leaves bf16 unset (bfloat16 on this CPU); the comparison is float32's.
                   "--set", "training.bf16=false")
    reference = losses(tmp_path / "one")
    assert len(reference) == 6
    for run in ("piped", "named"):
        other = losses(tmp_path / run)
        assert other.keys() == reference.keys()
        for step, loss in reference.items():
            assert abs(other[step] - loss) <= 1e-5 * abs(loss), (run, step, other[step], loss)
    for result, name in ((one, "tiny"), (piped, "tiny"), (named, "small")):
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "model.name is" in line]
        assert len(lines) == 1 and "model.name is '{}'".format(name) in lines[0], lines
    for run in ("one", "piped", "named"):
        exported = json.loads((tmp_path / run / "hf" / "config.json").read_text())
        assert (exported["d_model"], exported["num_layers"], exported["num_decoder_layers"]) == (96, 3, 2)


@pytest.mark.core
def test_the_ipu_backend_builds_and_places_the_weights_shape(custom_export, tmp_path, monkeypatch):
    from ipu_t5.training.trainer import T5Trainer

    from .backends.ipu import poptorch_standin

    poptorch_standin.install(monkeypatch, ipus=64)
    common = {"model.pretrained": str(custom_export), "training.max_steps": 2, "training.global_batch_size": 8,
              "data.demo_train_samples": 200, "validation.do_eval": "false", "training.fp16": "false"}
    runs = {}
    for backend, extra in (("single", {}), ("ipu", {"layout.stages": 2})):
        config = load_config("tiny", overrides=tiny_overrides(tmp_path / backend, **dict(
            common, **{"layout.backend": backend}, **extra)))
        trainer = T5Trainer(config)
        trainer.train()
        trainer.close()
        runs[backend] = trainer
    ipu = runs["ipu"]
    assert ipu.backend.name == "ipu" and ipu.plan.size.name == "custom"
    placed = [b for stage in ipu.plan.stage_blocks for b in stage]
    assert all(b in placed for b in ipu.plan.size.block_names) and "encoder.2" in placed
    one, other = losses(tmp_path / "single"), losses(tmp_path / "ipu")
    assert one.keys() == other.keys() == {1, 2}
    for step in one:
        assert other[step] == pytest.approx(one[step], rel=1e-5)
