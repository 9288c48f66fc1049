"""Writing a checkpoint: every process's share, atomically (staging directory, fsync, rename), with
a manifest of sizes and checksums written last; rotation of the periodic ones."""
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import yaml

from ..compat import export_config_dict
from ..errors import UserError
from ..models import TIED_ALIASES
from . import atomic, dcp
from .checksum_file import ChecksumFile
from .format import (FORMAT, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, PROCESS_FILE, SHARDED_DIR, STATE_FILE,
                     STEP_PREFIX, CheckpointError, checkpoints_dir, list_steps, step_path)
from .safetensors_stream import write_tensors

if TYPE_CHECKING:
    from .background import BackgroundSave


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A one-process checkpoint's weights: float32, contiguous, tied aliases left out."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items() if k not in TIED_ALIASES}


def flatten_optimizer_state(state: Mapping[str, Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """{name: {field: value}} -> {"name.field": tensor}, as stored in optimizer.safetensors."""
    flat = {}
    for name, fields in state.items():
        for field, value in fields.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
            flat["{}.{}".format(name, field)] = tensor.detach().cpu().contiguous()
    return flat


def one_process_tensors(backend, select: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
                        ) -> Dict[str, Dict[str, torch.Tensor]]:
    """What a one-process backend's checkpoint stores, by file: the weights (`select`ed) and the
    optimizer's state. On a CPU these are the live tensors themselves, not copies."""
    model_state = backend.model_state_dict()
    return {MODEL_FILE: _cpu_tensors(select(model_state) if select else model_state),
            OPTIMIZER_FILE: flatten_optimizer_state(backend.optimizer_state_dict())}


def _run_checkpoints(path: Path) -> List[Path]:
    """The complete checkpoints beside `path`, oldest first, when it is one of a run's periodic ones."""
    if path.parent.name != checkpoints_dir(Path()).name:
        return []
    return [step_path(path.parent.parent, step) for step in list_steps(path.parent.parent)]


def _no_space(path: Path, needed: int) -> CheckpointError:
    previous = path if (path / STATE_FILE).is_file() else None
    if previous is None:
        previous = (_run_checkpoints(path) or [None])[-1]
    return CheckpointError(
        "no space left on the device while writing the checkpoint {}: it needs about {} ({} bytes) "
        "and {} are free there. Free space, lower output.save_total_limit or choose another "
        "--output-dir; {}.".format(
            path, atomic.human_bytes(needed), needed, atomic.human_bytes(atomic.free_bytes(path.parent)),
            "the previous checkpoint {} is intact".format(previous) if previous else
            "no earlier checkpoint was touched"))


def save_checkpoint(path: Path, backend, trainer_state: Dict[str, Any], run_config: Dict[str, Any],
                    hf_config, tokenizer, select: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
                    background: Optional["BackgroundSave"] = None, then: Optional[Callable[[], Any]] = None) -> Path:
    """Write `backend`'s training state as a checkpoint at `path`, atomically. Every process calls it.

    `trainer_state` is what the loop needs to continue (step, data order, ...). Nothing at `path`
    changes unless the whole checkpoint was written; a full disk raises CheckpointError naming the
    path and the bytes needed. `select` picks the model weights to keep (a LoRA run keeps only its
    adapters: the base is its starting point). `then` runs on the main process once the checkpoint
    is in place (rotation).

    With `background` (a `BackgroundSave` with no write in flight) this returns once the state is
    copied to host memory, and the rest is written beside the caller's next steps: the checkpoint
    appears complete or not at all as before, and `background.wait()` finishes it (raising what
    the write raised, on every process).
    """
    from . import rng

    path = Path(path)
    # The superseded checkpoints' cached pages make room for this one's (atomic.drop_cached).
    for previous in _run_checkpoints(path):
        atomic.drop_cached(previous, (backend.process_index, backend.num_processes))
    shares = backend.checkpoint_state()
    if shares is not None and select is not None:
        shares = dict(shares, model=select(shares["model"]))
    process_states = backend.gather_object({"rng": rng.capture(), "backend": backend.extra_state()})
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    if shares is None:
        tensors = one_process_tensors(backend, select)
        if background is not None:
            tensors = background.host_copies(tensors)
        needed = sum(_tensor_bytes(t) for t in tensors.values())
    else:
        needed = sum(backend.gather_object(_tensor_bytes(dict(dcp.flat_shares(shares)))))

    def begin() -> str:
        atomic.remove_stale(path.parent, (STEP_PREFIX, path.name + "."))
        try:
            return str(atomic.staging_dir(path))
        except OSError as err:
            if atomic.is_no_space(err):
                raise _no_space(path, needed) from None
            raise

    staging = Path(backend.on_main(begin))

    def failed(err: BaseException) -> BaseException:
        if backend.is_main_process:
            shutil.rmtree(str(staging), ignore_errors=True)
        if not isinstance(err, UserError) and atomic.is_no_space(err):
            return _no_space(path, needed)
        return err

    def finish(written: Dict[str, Dict[str, object]]) -> None:
        try:
            for rank, state in enumerate(process_states):
                with open(str(staging / PROCESS_FILE.format(rank)), "w") as f:
                    json.dump(state, f)
            _write_main_files(staging, tensors, needed, trainer_state, run_config, hf_config, tokenizer,
                              backend.num_processes, shares is not None, path, written)
            atomic.replace_dir(staging, path)
        except BaseException as err:
            raise failed(err) from None
        if then is not None:
            then()

    if background is not None:
        background.start(backend, shares, staging, finish, failed)
        return path
    written: Dict[str, Dict[str, object]] = {}
    if shares is not None:
        try:
            recorded = dcp.transfer("save", shares, staging / SHARDED_DIR)
        except Exception as err:  # torch.distributed.checkpoint raises on every process alike
            raise failed(err) from None
        # Every process reads back, checksums and syncs its share of the files the writer did not.
        written = atomic.sharded_manifest(staging, backend.process_index, backend.num_processes, backend.gather_object,
                                          recorded)
    backend.on_main(lambda: finish(written))
    return path


def _write_main_files(staging: Path, tensors: Dict[str, Dict[str, torch.Tensor]], needed: int,
                      trainer_state: Dict[str, Any], run_config: Dict[str, Any], hf_config, tokenizer,
                      num_processes: int, sharded: bool, path: Path,
                      written: Dict[str, Dict[str, object]]) -> None:
    import transformers

    from .. import __version__

    (staging / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    with open(str(staging / "model_config.json"), "w") as f:
        json.dump(export_config_dict(hf_config, torch.float32), f, indent=2)
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    if tensors and atomic.free_bytes(staging) < needed:
        raise _no_space(path, needed)
    written = dict(written)
    for name, content in tensors.items():
        # Past the page cache, checksummed as written: the manifest reads none of it back.
        with ChecksumFile(staging / name) as f:
            write_tensors(f, content, metadata={"format": "pt"})
        written[name] = f.entry
    state = dict(trainer_state)
    state.update({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors": "torch.distributed.checkpoint" if sharded else "safetensors",
        "num_processes": num_processes,
        "versions": {"ipu_t5": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "files": atomic.fsync_tree(staging, checksum=True, done=written),
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


