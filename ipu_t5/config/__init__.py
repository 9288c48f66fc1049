"""Typed run configuration: the sections (`sections`), how a config is built from presets, YAML
files and overrides (`loading`), and the rules it must satisfy (`validation`)."""
from .loading import ALIASES, apply_mapping, apply_overrides, config_from_dict, load_config, preset_path, read_yaml
from .sections import (SECTIONS, DataConfig, IpuConfig, LayoutConfig, ModelConfig, OutputConfig, PeftConfig,
                       RunConfig, TaskConfig, TrainingConfig, ValidationConfig, all_keys)
from .validation import CHOICES, validate

__all__ = ["ALIASES", "CHOICES", "SECTIONS", "DataConfig", "IpuConfig", "LayoutConfig", "ModelConfig", "OutputConfig",
           "PeftConfig", "RunConfig", "TaskConfig", "TrainingConfig", "ValidationConfig", "all_keys", "apply_mapping",
           "apply_overrides", "config_from_dict", "load_config", "preset_path", "read_yaml", "validate"]
