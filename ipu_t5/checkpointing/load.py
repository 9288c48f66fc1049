"""Reading a checkpoint: find the newest intact one, check it (manifest, sizes, checksums, format,
model size, data order) before anything uses it, and load it into any backend's layout."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import yaml

from ..models import TIED_ALIASES
from . import atomic, dcp
from .format import (FORMAT, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, PROCESS_FILE, SHARDED_DIR, STATE_FILE,
                     CheckpointError, checkpoints_dir, list_steps, step_path)
from .views import DcpView, OptimizerView, SafetensorsView

_TIED = {alias: "shared.weight" for alias in TIED_ALIASES}


@dataclass
class Checkpoint:
    """A checkpoint that `inspect` found complete and intact."""

    path: Path
    state: Dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def sharded(self) -> bool:
        return self.state["tensors"] != "safetensors"

    def run_config(self) -> Dict[str, Any]:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def hf_config(self):
        from transformers import T5Config

        return T5Config.from_json_file(str(self.path / "model_config.json"))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    def model_tensors(self) -> Mapping[str, torch.Tensor]:
        """The weights by Hugging Face name (tied aliases included), read lazily."""
        if self.sharded:
            return DcpView(self.path / SHARDED_DIR, "model.", _TIED)
        return SafetensorsView(self.path / MODEL_FILE, _TIED)

    def optimizer_state(self) -> Mapping[str, Dict[str, torch.Tensor]]:
        """AdamW state by parameter name, read lazily."""
        if self.sharded:
            return OptimizerView(DcpView(self.path / SHARDED_DIR, "optimizer."))
        return OptimizerView(SafetensorsView(self.path / OPTIMIZER_FILE))

    def process_state(self, rank: int) -> Optional[Dict[str, Any]]:
        """Process `rank`'s generator states ("rng") and backend state ("backend"), if that
        process existed when it was saved."""
        path = self.path / PROCESS_FILE.format(rank)
        return json.loads(path.read_text()) if path.is_file() else None

    def load_into(self, backend, model: bool = True) -> None:
        """Load weights (unless not `model`: the backend was built from them) and optimizer state into
        `backend`, whatever layout either one has: a sharded checkpoint into a sharded backend
        through torch.distributed.checkpoint, anything else by name, each tensor read from disk when
        the backend looks it up."""
        shares = backend.checkpoint_state() if self.sharded else None
        if shares is not None:
            if not model:
                shares = {k: v for k, v in shares.items() if k != "model"}
            dcp.transfer("load", shares, self.path / SHARDED_DIR)
            backend.load_checkpoint_state(shares)
            return
        if model:
            backend.load_model_state_dict(self.model_tensors())
        backend.load_optimizer_state_dict(self.optimizer_state())


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError("checkpoint {} is unusable: {}.".format(path, why))


# A process's part in checking a checkpoint's checksums: (index, count, agree). It reads every
# count-th file from the index-th; `agree` takes its finding (an error or None) and returns the first
# error any process found, on every process, so all reach the same verdict.
Share = Tuple[int, int, Callable[[Optional[str]], Optional[str]]]


def inspect(path: Path, verify_data: bool = True, share: Optional[Share] = None) -> Checkpoint:
    """Check that `path` is a complete, intact checkpoint this version reads; raises
    CheckpointError naming what is wrong. `verify_data` also checks every file's CRC-32, all of them
    here or, with `share`, this process's part of them."""
    from .. import __version__

    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError("checkpoint {} does not exist: give a checkpoint directory such as "
                              "<output-dir>/checkpoints/step-N.".format(path))
    if not state_file.is_file():
        raise _damaged(path, "it has no {} (it was not completely written, or is not an ipu-t5 "
                             "checkpoint)".format(STATE_FILE))
    try:
        state = json.loads(state_file.read_text())
    except ValueError as err:
        raise _damaged(path, "{} is not valid JSON ({})".format(STATE_FILE, err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _damaged(path, "{} does not describe an ipu-t5 checkpoint".format(STATE_FILE))
    if state.get("format_version") != FORMAT_VERSION:
        raise _damaged(path, "it is in checkpoint format {} (written by ipu-t5 {}) but this ipu-t5 {} reads "
                             "format {}; use the ipu-t5 version that wrote it".format(
                                 state.get("format_version"), state.get("versions", {}).get("ipu_t5", "?"),
                                 __version__, FORMAT_VERSION))
    files = sorted(state.get("files", {}).items())
    for name, entry in files:
        file = path / name
        if not file.is_file():
            raise _damaged(path, "{} is missing".format(name))
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise _damaged(path, "{} has {} bytes, {} were written (truncated or overwritten)".format(
                name, size, entry["bytes"]))
    if verify_data:
        index, count, agree = share or (0, 1, None)
        error = None
        for name, entry in files[index::count]:
            with open(str(path / name), "rb") as f:
                crc = atomic.file_crc32(f)
            if crc != entry["crc32"]:
                error = "{} is corrupt (CRC-32 {} where {} was written)".format(name, crc, entry["crc32"])
                break
        if agree is not None:
            error = agree(error)
        if error is not None:
            raise _damaged(path, error)
    return Checkpoint(path, state)


def newest_usable(output_dir: Path, say: Callable[[str], None], verify_data: bool = True,
                  share: Optional[Share] = None) -> Optional[Checkpoint]:
    """The newest intact checkpoint of a run; each damaged one passed over is reported with `say`.
    None when the run has none at all."""
    failures = []
    for step in reversed(list_steps(output_dir)):
        try:
            found = inspect(step_path(output_dir, step), verify_data, share)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        for failure in failures:
            say("ipu-t5: {} Falling back to the previous good checkpoint, {}.".format(failure, found.path))
        return found
    if failures:
        raise CheckpointError("no usable checkpoint in {}: {} Start afresh with --overwrite, or give "
                              "--resume PATH.".format(checkpoints_dir(output_dir), " ".join(failures)))
    return None


def resolve(spec: str, output_dir: Path, say: Callable[[str], None], verify_data: bool = True,
            share: Optional[Share] = None) -> Optional[Checkpoint]:
    """The checkpoint `--resume` names: "auto" for the run's newest intact one (None if it has
    none yet), or a path."""
    if spec == "auto":
        found = newest_usable(output_dir, say, verify_data, share)
        if found is None:
            say("ipu-t5: no checkpoint in {} yet: starting from step 0.".format(checkpoints_dir(output_dir)))
        return found
    path = Path(spec)
    if path.is_dir() and not (path / STATE_FILE).exists() and list_steps(path):
        raise CheckpointError("{} is a run's output directory, not a checkpoint: give one of its "
                              "checkpoints/step-N, or --resume auto with --output-dir {}.".format(path, path))
    return inspect(path, verify_data, share)


def find_for_resume(backend, spec: str, output_dir: Path, say: Callable[[str], None]) -> Optional[Checkpoint]:
    """`resolve` with every file's checksum verified, the files shared out over the backend's
    processes (read in parallel, none reading the whole checkpoint); every process gets the same
    answer."""
    def agree(error: Optional[str]) -> Optional[str]:
        return next((e for e in backend.gather_object(error) if e is not None), None)

    return resolve(spec, output_dir, say, True, (backend.process_index, backend.num_processes, agree))


# ----- compatibility with the run that resumes -----

ARCHITECTURE = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "feed_forward_proj")


def check_architecture(checkpoint: Checkpoint, size) -> None:
    """Refuse a checkpoint of another model size than the run's `size` (a models.ModelSize)."""
    from ..models import SIZES

    saved = checkpoint.hf_config()
    expected = dict(size.t5_config_kwargs())
    differences = ["{} {} (run: {})".format(k, getattr(saved, k), expected[k]) for k in ARCHITECTURE
                   if getattr(saved, k) != expected[k]]
    if differences:
        match = next((s.name for s in SIZES.values() if all(
            getattr(saved, k) == s.t5_config_kwargs()[k] for k in ARCHITECTURE)), None)
        hint = "resume with --model {}".format(match) if match else \
            "resume with the --model or --pretrained the run started from"
        raise CheckpointError("checkpoint {} holds another model than this run's '{}': {}. {}, or "
                              "choose a checkpoint of this run.".format(
                                  checkpoint.path, size.name, ", ".join(differences), hint))


def check_tensors(checkpoint: Checkpoint, expected: Dict[str, tuple]) -> None:
    """Refuse a checkpoint whose stored weights are not exactly `expected` (name -> shape)."""
    stored = {k: v for k, v in checkpoint.model_tensors().shapes().items() if k not in TIED_ALIASES}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != tuple(stored[k]))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append("{} weight(s) missing (e.g. {})".format(len(missing), missing[0]))
        if extra:
            parts.append("{} unexpected weight(s) (e.g. {})".format(len(extra), extra[0]))
        if wrong:
            parts.append("{} of shape {} where the model has {}".format(wrong[0], stored[wrong[0]], expected[wrong[0]]))
        raise CheckpointError("checkpoint {} does not fit this model: {}.".format(checkpoint.path, "; ".join(parts)))


def check_data_order(checkpoint: Checkpoint, current: Dict[str, int]) -> None:
    """Refuse to continue a data order over other data, batch size or seed."""
    saved = checkpoint.state["data_order"]
    # Checkpoints from before length grouping existed continued an ungrouped order.
    saved = dict(saved, group_by_length=saved.get("group_by_length", False))
    keys = ("num_examples", "global_batch_size", "seed", "group_by_length")
    differences = ["{} {} (now {})".format(k, saved[k], current[k]) for k in keys if saved[k] != current[k]]
    if differences:
        raise CheckpointError("checkpoint {} continues a data order over other data: {}. Resume with the "
                              "same training data, training.global_batch_size, training.seed and data.group_by_length.".format(
                                  checkpoint.path, ", ".join(differences)))


