"""Training checkpoints that survive preemption, full disks and changes of layout.

A checkpoint is a directory, `<output-dir>/checkpoints/step-N` for the periodic ones:

- `model.safetensors`: the weights by Hugging Face name, float32.
- `optimizer.safetensors`: AdamW state by parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`,
  `<name>.step`). The learning-rate schedule is a function of the step (`optim.lr_at`), so it has
  no state of its own.
- or, instead of those two, `state/`: the same names (`model.<name>`, `optimizer.<name>.<field>`)
  written by every process of a sharded backend together through torch.distributed.checkpoint
  (see `Backend.checkpoint_state`).
- `process_state_<rank>.json`: every process's random generator states, and what its backend
  adds (`Backend.extra_state`: a device's generator, a loss scale).
- `config.yaml`, `model_config.json`, `tokenizer/`.
- `trainer_state.json`: step, data order, best and last validation, versions, and a manifest of
  every other file's size and CRC-32. Written last; its presence marks the checkpoint complete.

Because tensors are stored by name, not by device, any layout (stages, replicas, IPU or torch)
loads any checkpoint. Writing goes through `atomic` (staging directory, fsync, rename), so a crash
never leaves a checkpoint that looks complete, and `inspect` finds a damaged one before use.
"""
import re
from pathlib import Path
from typing import List

from ..errors import UserError

FORMAT = "ipu-t5 checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARDED_DIR = "state"
PROCESS_FILE = "process_state_{}.json"
STEP_PREFIX = "step-"
_STEP_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it and says why."""


def checkpoints_dir(output_dir: Path) -> Path:
    """Where a run keeps its periodic checkpoints."""
    return Path(output_dir) / "checkpoints"


def step_path(output_dir: Path, step: int) -> Path:
    """The periodic checkpoint of `step`."""
    return checkpoints_dir(output_dir) / "{}{}".format(STEP_PREFIX, step)


def list_steps(output_dir: Path) -> List[int]:
    """Steps of the periodic checkpoints that look complete, oldest first."""
    directory = checkpoints_dir(output_dir)
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _STEP_NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)

