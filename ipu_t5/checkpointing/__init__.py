"""Checkpointing and export: layout-free training checkpoints (one-process safetensors, or
torch.distributed.checkpoint shares), written atomically and checked before use; the Hugging Face
export with its reload check; the peft adapter export; random-generator state; the run directory.

The training checkpoint's API is collected here: `from ipu_t5 import checkpointing`, then
`checkpointing.save_checkpoint(...)`, `checkpointing.inspect(path)`, ..."""
import importlib
from typing import Any

# Name -> the submodule that defines it; imported on first use (PEP 562), so that a process that
# only needs `run_dir` or `atomic` (the multi-process launcher) imports neither torch nor safetensors.
_NAMES = {
    "background": ["BackgroundSave"],
    "format": ["FORMAT", "FORMAT_VERSION", "MODEL_FILE", "OPTIMIZER_FILE", "PROCESS_FILE", "SHARDED_DIR", "STATE_FILE",
               "STEP_PREFIX", "CheckpointError", "checkpoints_dir", "list_steps", "step_path"],
    "load": ["Checkpoint", "check_architecture", "check_data_order", "check_tensors", "find_for_resume", "inspect",
             "newest_usable", "resolve"],
    "save": ["flatten_optimizer_state", "one_process_tensors", "rotate", "save_checkpoint", "update_trainer_state"],
}
_HOME = {name: module for module, names in _NAMES.items() for name in names}

__all__ = ["BackgroundSave", "FORMAT", "FORMAT_VERSION", "MODEL_FILE", "OPTIMIZER_FILE", "PROCESS_FILE", "SHARDED_DIR", "STATE_FILE",
           "STEP_PREFIX", "Checkpoint", "CheckpointError", "check_architecture", "check_data_order", "check_tensors",
           "checkpoints_dir", "find_for_resume", "flatten_optimizer_state", "inspect", "list_steps", "newest_usable",
           "one_process_tensors",
           "resolve", "rotate", "save_checkpoint", "step_path", "update_trainer_state"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module("." + _HOME[name], __name__), name)
    raise AttributeError("module '{}' has no attribute '{}'".format(__name__, name))


def __dir__():
    return sorted(list(globals()) + list(_HOME))
