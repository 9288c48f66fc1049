"""Checkpointing and export: layout-free training checkpoints (one-process safetensors, or
torch.distributed.checkpoint shares), written atomically and checked before use; the Hugging Face
export with its reload check; the peft adapter export; random-generator state; the run directory.

The training checkpoint's API is collected here: `from ipu_t5 import checkpointing`, then
`checkpointing.save_checkpoint(...)`, `checkpointing.inspect(path)`, ..."""
from .format import (FORMAT, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, PROCESS_FILE, SHARDED_DIR, STATE_FILE,
                     STEP_PREFIX, CheckpointError, checkpoints_dir, list_steps, step_path)
from .load import (Checkpoint, check_architecture, check_data_order, check_tensors, find_for_resume, inspect,
                   newest_usable, resolve)
from .save import flatten_optimizer_state, rotate, save_checkpoint, update_trainer_state

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_FILE", "OPTIMIZER_FILE", "PROCESS_FILE", "SHARDED_DIR", "STATE_FILE",
           "STEP_PREFIX", "Checkpoint", "CheckpointError", "check_architecture", "check_data_order", "check_tensors",
           "checkpoints_dir", "find_for_resume", "flatten_optimizer_state", "inspect", "list_steps", "newest_usable",
           "resolve", "rotate", "save_checkpoint", "step_path", "update_trainer_state"]
