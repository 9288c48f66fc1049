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
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from safetensors.torch import save_file

from . import atomic
from .compat import export_config_dict
from .errors import UserError
from .models import TIED_ALIASES

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


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def flatten_optimizer_state(state: Mapping[str, Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """{name: {field: value}} -> {"name.field": tensor}, as stored in optimizer.safetensors."""
    flat = {}
    for name, fields in state.items():
        for field, value in fields.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
            flat["{}.{}".format(name, field)] = tensor.detach().cpu().contiguous()
    return flat


# ----- writing -----

def _no_space(path: Path, needed: int) -> CheckpointError:
    previous = path if (path / STATE_FILE).is_file() else None
    if previous is None and path.parent.name == checkpoints_dir(Path()).name:
        steps = list_steps(path.parent.parent)
        previous = step_path(path.parent.parent, steps[-1]) if steps else None
    return CheckpointError(
        "no space left on the device while writing the checkpoint {}: it needs about {} ({} bytes) "
        "and {} are free there. Free space, lower output.save_total_limit or choose another "
        "--output-dir; {}.".format(
            path, atomic.human_bytes(needed), needed, atomic.human_bytes(atomic.free_bytes(path.parent)),
            "the previous checkpoint {} is intact".format(previous) if previous else
            "no earlier checkpoint was touched"))


def save_checkpoint(path: Path, backend, trainer_state: Dict[str, Any], run_config: Dict[str, Any],
                    hf_config, tokenizer, select: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> Path:
    """Write `backend`'s training state as a checkpoint at `path`, atomically. Every process calls it.

    `trainer_state` is what the loop needs to continue (step, data order, ...). Nothing at `path`
    changes unless the whole checkpoint was written; a full disk raises CheckpointError naming the
    path and the bytes needed. `select` picks the model weights to keep (a LoRA run keeps only its
    adapters: the base is its starting point).
    """
    from . import rng

    path = Path(path)
    shares = backend.checkpoint_state()
    if shares is not None and select is not None:
        shares = dict(shares, model=select(shares["model"]))
    process_states = backend.gather_object({"rng": rng.capture(), "backend": backend.extra_state()})
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    if shares is None:
        from .export import export_tensors

        model_state = backend.model_state_dict()
        tensors = {MODEL_FILE: export_tensors(select(model_state) if select else model_state, torch.float32),
                   OPTIMIZER_FILE: flatten_optimizer_state(backend.optimizer_state_dict())}
        needed = sum(_tensor_bytes(t) for t in tensors.values())
    else:
        needed = sum(backend.gather_object(_tensor_bytes(dict(_flat_shares(shares)))))

    def begin() -> str:
        atomic.remove_stale(path.parent, (STEP_PREFIX, path.name + "."))
        try:
            return str(atomic.staging_dir(path))
        except OSError as err:
            if atomic.is_no_space(err):
                raise _no_space(path, needed) from None
            raise

    staging = Path(backend.on_main(begin))
    if shares is not None:
        try:
            _dcp("save", shares, staging / SHARDED_DIR)
        except Exception as err:  # torch.distributed.checkpoint raises on every process alike
            if backend.is_main_process:
                shutil.rmtree(str(staging), ignore_errors=True)
            if atomic.is_no_space(err):
                raise _no_space(path, needed) from None
            raise

    def finish() -> None:
        try:
            for rank, state in enumerate(process_states):
                with open(str(staging / PROCESS_FILE.format(rank)), "w") as f:
                    json.dump(state, f)
            _write_main_files(staging, tensors, needed, trainer_state, run_config, hf_config, tokenizer,
                              backend.num_processes, shares is not None, path)
            atomic.replace_dir(staging, path)
        except BaseException as err:
            shutil.rmtree(str(staging), ignore_errors=True)
            if not isinstance(err, UserError) and atomic.is_no_space(err):
                raise _no_space(path, needed) from None
            raise

    backend.on_main(finish)
    return path


def _write_main_files(staging: Path, tensors: Dict[str, Dict[str, torch.Tensor]], needed: int,
                      trainer_state: Dict[str, Any], run_config: Dict[str, Any], hf_config, tokenizer,
                      num_processes: int, sharded: bool, path: Path) -> None:
    import transformers

    from . import __version__

    (staging / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    with open(str(staging / "model_config.json"), "w") as f:
        json.dump(export_config_dict(hf_config, torch.float32), f, indent=2)
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    if tensors and atomic.free_bytes(staging) < needed:
        raise _no_space(path, needed)
    for name, content in tensors.items():
        save_file(content, str(staging / name), metadata={"format": "pt"})
    state = dict(trainer_state)
    state.update({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors": "torch.distributed.checkpoint" if sharded else "safetensors",
        "num_processes": num_processes,
        "versions": {"ipu_t5": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "files": atomic.fsync_tree(staging, checksum=True),
    })
    # Written last and synced (the other files already are): its presence marks the checkpoint complete.
    with open(str(staging / STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    atomic.fsync_path(staging)


def update_trainer_state(path: Path, **values: Any) -> None:
    """Add `values` to a complete checkpoint's trainer_state.json (an evaluation that finished after
    it was written), atomically; the manifest is unaffected."""
    state_file = Path(path) / STATE_FILE
    state = json.loads(state_file.read_text())
    state.update(values)
    atomic.write_file(state_file, json.dumps(state, indent=2))


def rotate(output_dir: Path, keep: int, protect: Sequence[int] = ()) -> List[int]:
    """Delete all but the newest `keep` complete periodic checkpoints and those of `protect` (the
    best one); returns the steps removed."""
    steps = list_steps(output_dir)
    kept = set(steps[-keep:]) | set(protect)
    removed = [s for s in steps if s not in kept]
    for step in removed:
        shutil.rmtree(str(step_path(output_dir, step)), ignore_errors=True)
    return removed


# ----- reading -----

class SafetensorsView(Mapping):
    """A safetensors file as a mapping whose tensors are read from disk when looked up, so a
    process that holds part of the model reads only its part. `aliases` maps extra names to
    stored ones (T5's tied embeddings)."""

    def __init__(self, path: Path, aliases: Optional[Dict[str, str]] = None):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._aliases = {k: v for k, v in (aliases or {}).items() if v in self._file.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        if stored not in self._file.keys():
            raise KeyError(name)
        return self._file.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._file.keys()) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._file.keys()) + len(self._aliases)

    def shapes(self) -> Dict[str, tuple]:
        """Stored tensor shapes by name, from the header alone."""
        return {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}


class DcpView(Mapping):
    """The tensors under `prefix` in a torch.distributed.checkpoint directory, read one name at a
    time (a single process reading what several wrote)."""

    def __init__(self, path: Path, prefix: str, aliases: Optional[Dict[str, str]] = None):
        self._path = path
        self._prefix = prefix
        self._meta = {k[len(prefix):]: v for k, v in _dcp_metadata(path).items() if k.startswith(prefix)}
        self._aliases = {k: v for k, v in (aliases or {}).items() if v in self._meta}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        if stored not in self._meta:
            raise KeyError(name)
        shape, dtype = self._meta[stored]
        template = {self._prefix + stored: torch.empty(shape, dtype=dtype)}
        _dcp("load", template, self._path)
        return template[self._prefix + stored]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._meta) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._meta) + len(self._aliases)

    def shapes(self) -> Dict[str, tuple]:
        return {k: tuple(shape) for k, (shape, _) in self._meta.items()}


class OptimizerView(Mapping):
    """Flat `name.field` tensors seen as {name: {field: tensor}}, read when looked up."""

    def __init__(self, flat: Mapping[str, torch.Tensor]):
        self._flat = flat
        self._fields: Dict[str, List[str]] = {}
        for key in flat:
            name, _, field = key.rpartition(".")
            self._fields.setdefault(name, []).append(field)

    def __getitem__(self, name: str) -> Dict[str, torch.Tensor]:
        return {f: self._flat["{}.{}".format(name, f)] for f in self._fields[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


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

    def load_into(self, backend) -> None:
        """Load weights and optimizer state into `backend`, whatever layout either one has."""
        shares = backend.checkpoint_state() if self.sharded else None
        if shares is not None:
            _dcp("load", shares, self.path / SHARDED_DIR)
            backend.load_checkpoint_state(shares)
            return
        backend.load_model_state_dict(self.model_tensors())
        backend.load_optimizer_state_dict(self.optimizer_state())


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError("checkpoint {} is unusable: {}.".format(path, why))


def inspect(path: Path, verify_data: bool = True) -> Checkpoint:
    """Check that `path` is a complete, intact checkpoint this version reads; raises
    CheckpointError naming what is wrong. `verify_data` also checks every file's CRC-32."""
    from . import __version__

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
    for name, entry in sorted(state.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            raise _damaged(path, "{} is missing".format(name))
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise _damaged(path, "{} has {} bytes, {} were written (truncated or overwritten)".format(
                name, size, entry["bytes"]))
        if verify_data:
            with open(str(file), "rb") as f:
                crc = atomic.file_crc32(f)
            if crc != entry["crc32"]:
                raise _damaged(path, "{} is corrupt (CRC-32 {} where {} was written)".format(name, crc, entry["crc32"]))
    return Checkpoint(path, state)


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


def newest_usable(output_dir: Path, say: Callable[[str], None], verify_data: bool = True) -> Optional[Checkpoint]:
    """The newest intact checkpoint of a run; each damaged one passed over is reported with `say`.
    None when the run has none at all."""
    failures = []
    for step in reversed(list_steps(output_dir)):
        try:
            found = inspect(step_path(output_dir, step), verify_data)
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


def resolve(spec: str, output_dir: Path, say: Callable[[str], None], verify_data: bool = True) -> Optional[Checkpoint]:
    """The checkpoint `--resume` names: "auto" for the run's newest intact one (None if it has
    none yet), or a path."""
    if spec == "auto":
        found = newest_usable(output_dir, say, verify_data)
        if found is None:
            say("ipu-t5: no checkpoint in {} yet: starting from step 0.".format(checkpoints_dir(output_dir)))
        return found
    path = Path(spec)
    if path.is_dir() and not (path / STATE_FILE).exists() and list_steps(path):
        raise CheckpointError("{} is a run's output directory, not a checkpoint: give one of its "
                              "checkpoints/step-N, or --resume auto with --output-dir {}.".format(path, path))
    return inspect(path, verify_data)


def find_for_resume(backend, spec: str, output_dir: Path, say: Callable[[str], None]) -> Optional[Checkpoint]:
    """`resolve` with every file's checksum verified, by the main process alone; every process gets
    the same answer."""
    path = backend.on_main(lambda: _path_of(resolve(spec, output_dir, say)))
    return inspect(Path(path), verify_data=False) if path is not None else None


def _path_of(found: Optional[Checkpoint]) -> Optional[str]:
    return str(found.path) if found is not None else None


# ----- compatibility with the run that resumes -----

ARCHITECTURE = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "feed_forward_proj")


def check_architecture(checkpoint: Checkpoint, size) -> None:
    """Refuse a checkpoint of another model size than the run's `size` (a models.ModelSize)."""
    from .models import SIZES

    saved = checkpoint.hf_config()
    expected = dict(size.t5_config_kwargs())
    differences = ["{} {} (run: {})".format(k, getattr(saved, k), expected[k]) for k in ARCHITECTURE
                   if getattr(saved, k) != expected[k]]
    if differences:
        match = next((s.name for s in SIZES.values() if all(
            getattr(saved, k) == s.t5_config_kwargs()[k] for k in ARCHITECTURE)), None)
        hint = "resume with --model {}".format(match) if match else "resume with the model size that wrote it"
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


# ----- torch.distributed.checkpoint -----

def _flat_shares(shares: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    for key, value in shares.items():
        if isinstance(value, Mapping):
            yield from _flat_shares(value, "{}{}.".format(prefix, key))
        elif torch.is_tensor(value):
            yield prefix + key, value


def _dcp(operation: str, state: Dict[str, Any], path: Path) -> None:
    """torch.distributed.checkpoint's "save" (every process writes its share of `state`) or "load"
    (fills `state`'s tensors in place, each process reading what it holds): dcp.save / dcp.load
    from torch 2.2, save_state_dict / load_state_dict in the SDK's torch 2.0."""
    import inspect as pyinspect

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if hasattr(dcp, operation):
        function, args, kwargs = getattr(dcp, operation), (state,), {"checkpoint_id": str(path)}
    else:
        storage = dcp.FileSystemWriter if operation == "save" else dcp.FileSystemReader
        function, args, kwargs = getattr(dcp, operation + "_state_dict"), (state, storage(str(path))), {}
    # Without a process group (one process reading what a sharded backend wrote): say so where
    # this torch asks, and do not warn about it.
    alone = not (dist.is_available() and dist.is_initialized())
    if alone and "no_dist" in pyinspect.signature(function).parameters:
        kwargs["no_dist"] = True
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        function(*args, **kwargs)


def _dcp_metadata(path: Path) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
