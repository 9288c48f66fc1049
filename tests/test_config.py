"""Config loading, overrides and every bad input that must end in one clear UserError."""
import pytest

from ipu_t5.config import RunConfig, config_from_dict, load_config
from ipu_t5.errors import UserError

pytestmark = pytest.mark.core


def test_defaults_are_the_tiny_preset():
    config = load_config()
    assert config.model.name == "tiny"
    assert config.model.dropout_rate == 0.0  # from configs/tiny.yaml, not the dataclass default
    assert config.training.max_steps == 500
    assert str(config.output_dir) == "runs/tiny"


def test_preset_per_size_and_aliases():
    xxl = load_config("xxl")
    assert xxl.model.name == "xxl"
    assert (xxl.training.global_batch_size, xxl.training.max_steps, xxl.training.learning_rate) == (128, 500, 5e-6)
    assert xxl.training.warmup_steps == 10 and xxl.training.lr_scheduler_type == "constant"
    assert xxl.layout.stages == 16
    assert load_config("flan-t5-xl").layout.stages == 8
    assert load_config("google/flan-t5-small").model.name == "google/flan-t5-small"


def test_precedence_file_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 5e-6\n  max_steps: 7\nlayout:\n  layers_per_ipu: [2, 2]\n")
    config = load_config("tiny", path, ["training.max_steps=9"], **{"training.seed": 3})
    # PyYAML reads 5e-6 as a string; the float field accepts it.
    assert config.training.learning_rate == 5e-6
    assert config.training.max_steps == 9
    assert config.training.seed == 3
    assert config.layout.layers_per_stage == [2, 2]


def test_set_parses_types():
    config = load_config(overrides=["training.bf16=true", "validation.max_new_tokens=none",
                                    "layout.layers_per_stage=1,3", "data.data_files={train: a.jsonl}",
                                    "data.source=files"])
    assert config.training.bf16 is True
    assert config.validation.max_new_tokens is None
    assert config.layout.layers_per_stage == [1, 3]
    assert config.data.data_files == {"train": "a.jsonl"}


def test_round_trip_through_dict():
    config = load_config("tiny", overrides=["training.max_steps=12"])
    assert config_from_dict(config.to_dict()) == config


def _error(*args, **kwargs):
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def _file_error(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return _error(config_file=path), path


def test_unknown_key_suggests_nearest():
    message = _error(overrides=["training.learning_rat=1e-3"])
    assert "unknown config key 'training.learning_rat'" in message
    assert "Did you mean 'training.learning_rate'?" in message


def test_key_in_wrong_section_suggests_right_one():
    assert "Did you mean 'layout.stages'?" in _error(overrides=["training.stages=2"])


def test_unknown_section_in_file(tmp_path):
    message, _ = _file_error(tmp_path, "trainin:\n  max_steps: 3\n")
    assert "unknown config section 'trainin'" in message and "'training'" in message


def test_wrong_type_names_value_and_key():
    message = _error(overrides=["training.max_steps=abc"])
    assert "training.max_steps must be an integer" in message and "'abc'" in message


def test_wrong_type_in_file(tmp_path):
    message, path = _file_error(tmp_path, "training:\n  global_batch_size: [1, 2]\n")
    assert "training.global_batch_size must be an integer" in message and str(path) in message


@pytest.mark.parametrize("key", ["training.max_steps", "training.global_batch_size", "layout.stages"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts(key, value):
    message = _error(overrides=["{}={}".format(key, value)])
    assert "{} must be a positive integer, got {}".format(key, value) in message


def test_negative_learning_rate():
    assert "must not be negative" in _error(overrides=["training.learning_rate=-1e-4"])


def test_bad_choice_suggests():
    message = _error(overrides=["training.lr_scheduler_type=linaer"])
    assert "must be one of constant, linear" in message and "Did you mean 'linear'?" in message


def test_unknown_model():
    message = _error("xxxl")
    assert "unknown model 'xxxl'" in message and "xxl" in message


def test_missing_config_file(tmp_path):
    message = _error(config_file=tmp_path / "nope.yaml")
    assert "nope.yaml' does not exist" in message


def test_yaml_that_does_not_parse(tmp_path):
    message, _ = _file_error(tmp_path, "training:\n  max_steps: [1, 2\n")
    assert "is not valid YAML" in message and "line" in message


def test_set_without_equals():
    assert "--set needs section.key=value" in _error(overrides=["training.max_steps"])


def test_files_source_needs_files():
    assert "--data-files" in _error(overrides=["data.source=files"])


def test_unknown_task():
    assert "task 'nli' is not registered" in _error(overrides=["data.task=nli"])


def test_conflicting_precisions_and_micro_batch_spec():
    assert "choose one precision" in _error(overrides=["training.bf16=true", "training.fp16=true"])
    assert "not both" in _error(overrides=["layout.micro_batch_size=4", "layout.gradient_accumulation_steps=2"])


def test_dataclass_defaults_are_valid():
    from ipu_t5.config import validate

    config = RunConfig()
    assert validate(config) is config
