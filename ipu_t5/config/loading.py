"""Building a RunConfig: presets, YAML files, spellings from other tools, `--set` overrides.

Precedence, lowest first: dataclass defaults, the preset of `--model`, `--config FILE`, flags and
`--set section.key=value`. Values are type-checked as they are set; `validate` checks the rest.
"""
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union, get_type_hints

import yaml

from ..errors import UserError
from .sections import SECTIONS, RunConfig, all_keys
from .validation import suggest, validate

# Spellings users bring from TrainingArguments, IPUConfig or transformers 4.x, mapped to ours.
ALIASES = {
    "layout.layers_per_ipu": "layout.layers_per_stage",
    "layout.ipus_per_replica": "layout.stages",
    "layout.replication_factor": "layout.replicas",
    "training.lr": "training.learning_rate",
    "validation.eval_batch_size": "validation.per_device_eval_batch_size",
    "validation.evaluation_steps": "validation.eval_steps",
    "output.overwrite": "output.overwrite_output_dir",
    "output.metric_for_best_model": "validation.metric_for_best_model",
    # optimum-graphcore's IPUConfig names, written under `ipu:` as its users do.
    "ipu.layers_per_ipu": "layout.layers_per_stage",
    "ipu.ipus_per_replica": "layout.stages",
    "ipu.replication_factor": "layout.replicas",
    "ipu.gradient_accumulation_steps": "layout.gradient_accumulation_steps",
    "task.name": "data.task",
    "peft.rank": "peft.r",
    "peft.alpha": "peft.lora_alpha",
    "peft.dropout": "peft.lora_dropout",
}


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = getattr(tp, "__origin__", None)
    if origin in (list, List):
        return "a list of " + _type_name(tp.__args__[0]).replace("an ", "").replace("a ", "") + "s"
    if origin in (dict, Dict):
        return "a mapping of names to strings"
    return str(tp)


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check `value` against the field type `tp`; text from the command line is parsed first."""
    origin = getattr(tp, "__origin__", None)
    if origin is Union:
        inner = [a for a in tp.__args__ if a is not type(None)]
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        return _coerce(key, value, inner[0], from_text)
    if from_text and isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads 5e-6 (no dot) as a string: accept any text that is a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, List):
        if isinstance(value, (int, str)) and from_text:
            # "3,3", "3 3" or "q,v": one element per item, each parsed as the element type.
            value = str(value).replace(",", " ").split()
        if isinstance(value, list):
            return [_coerce(key, v, tp.__args__[0], from_text) for v in value]
    elif origin in (dict, Dict):
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: str(v) for k, v in value.items()}
    raise UserError(
        "{} must be {}, got {!r} ({}). Fix it in the config file or with --set {}=VALUE.".format(
            key, _type_name(tp), value, type(value).__name__, key
        )
    )


def _resolve_key(key: str) -> str:
    key = ALIASES.get(key, key)
    if key not in all_keys():
        raise UserError("unknown config key '{}'.{}".format(key, suggest(key, all_keys())))
    return key


def _set(config: RunConfig, key: str, value: Any, from_text: bool = False) -> None:
    key = _resolve_key(key)
    section, name = key.split(".")
    obj = getattr(config, section)
    tp = get_type_hints(type(obj))[name]
    setattr(obj, name, _coerce(key, value, tp, from_text))


def apply_mapping(config: RunConfig, data: Mapping[str, Any], source: str) -> None:
    """Overlay a nested {section: {key: value}} mapping (a parsed YAML file) onto `config`."""
    if not isinstance(data, Mapping):
        raise UserError("{} must hold a mapping of sections (model, data, training, ...), got {}".format(
            source, type(data).__name__))
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError("unknown config section '{}' in {}.{}".format(
                section, source, suggest(str(section), list(SECTIONS))))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise UserError("section '{}' in {} must be a mapping of keys to values".format(section, source))
        for name, value in values.items():
            try:
                _set(config, "{}.{}".format(section, name), value)
            except UserError as err:
                raise UserError("{} (in {})".format(err, source)) from None


def apply_overrides(config: RunConfig, overrides: List[str]) -> None:
    """Apply `section.key=value` strings from the command line."""
    for item in overrides:
        if "=" not in item:
            raise UserError("--set needs section.key=value, got '{}' (e.g. --set training.learning_rate=5e-6)".format(item))
        key, value = item.split("=", 1)
        _set(config, key.strip(), value.strip(), from_text=True)


def read_yaml(path: Union[str, Path]) -> Any:
    """Parse a YAML file, turning a missing file or a syntax error into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file '{}' does not exist. Give an existing YAML file, or --model NAME for a preset.".format(path))
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = " at line {}".format(mark.line + 1) if mark is not None else ""
        raise UserError("config file '{}' is not valid YAML{}: {}. Fix the syntax.".format(
            path, where, getattr(err, "problem", err))) from None


def config_dirs() -> List[Path]:
    """Where presets live: the source checkout's configs/, then an installed copy."""
    return [
        Path(__file__).resolve().parent.parent.parent / "configs",
        Path(sys.prefix) / "share" / "ipu-t5" / "configs",
    ]


def preset_path(model_name: str) -> Optional[Path]:
    """The YAML preset of a registered model size, if one is shipped."""
    from ..models import canonical_size

    stem = canonical_size(model_name).preset
    for directory in config_dirs():
        candidate = directory / (stem + ".yaml")
        if candidate.is_file():
            return candidate
    return None


def load_config(
    model: Optional[str] = None,
    config_file: Optional[Union[str, Path]] = None,
    overrides: Optional[List[str]] = None,
    **values: Any
) -> RunConfig:
    """Build and validate a RunConfig.

    `model` picks a preset by size name, `config_file` overlays a YAML file, `overrides` are
    `section.key=value` strings, and `values` are `section.key` -> value pairs already typed
    (the CLI's dedicated flags), e.g. ``load_config("tiny", **{"training.max_steps": 20})``.
    """
    config = RunConfig()
    file_data = read_yaml(config_file) if config_file else {}
    name = model or ((file_data.get("model") or {}).get("name") if isinstance(file_data, Mapping) else None)
    _set(config, "model.name", name or config.model.name)
    preset = preset_path(config.model.name)
    if preset is not None:
        apply_mapping(config, read_yaml(preset), str(preset))
    if config_file:
        apply_mapping(config, file_data, str(config_file))
    if model:
        config.model.name = model
    apply_overrides(config, overrides or [])
    for key, value in values.items():
        if value is not None:
            _set(config, key, value)
    return validate(config)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (checkpoints, run records)."""
    config = RunConfig()
    apply_mapping(config, data, "saved config")
    return validate(config)
