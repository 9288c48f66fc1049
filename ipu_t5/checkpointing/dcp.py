"""torch.distributed.checkpoint for sharded backends: every process writes (or reads) its own share
of one state dict, by name; a single process can read what several wrote."""
import inspect
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch


def flat_shares(shares: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor of a nested state dict, as DCP names them."""
    for key, value in shares.items():
        if isinstance(value, Mapping):
            yield from flat_shares(value, "{}{}.".format(prefix, key))
        elif torch.is_tensor(value):
            yield prefix + key, value


def transfer(operation: str, state: Dict[str, Any], path: Path,
             alone: bool = False) -> Optional[Dict[str, Dict[str, object]]]:
    """torch.distributed.checkpoint's "save" (every process writes its share of `state`) or "load"
    (fills `state`'s tensors in place, each process reading what it holds): dcp.save / dcp.load
    from torch 2.2, save_state_dict / load_state_dict in the SDK's torch 2.0. `alone`: this process
    only, without the collective the other processes would have to join (a load of names that only
    this process asks for). A save returns what `checksum_writer` recorded of the files this
    process wrote (None where this torch has no such writer)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    writer = checksum_writer(path) if operation == "save" else None
    if writer is not None:
        function, args, kwargs = dcp.save, (state,), {"storage_writer": writer}
    elif hasattr(dcp, operation):
        function, args, kwargs = getattr(dcp, operation), (state,), {"checkpoint_id": str(path)}
    else:
        storage = dcp.FileSystemWriter if operation == "save" else _reader()
        function, args, kwargs = getattr(dcp, operation + "_state_dict"), (state, storage(str(path))), {}
    # Without a process group (one process reading what a sharded backend wrote): say so where
    # this torch asks, and do not warn about it.
    alone = alone or not (dist.is_available() and dist.is_initialized())
    if alone and "no_dist" in inspect.signature(function).parameters:
        kwargs["no_dist"] = True
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        function(*args, **kwargs)
    return None if writer is None else writer.written


def checksum_writer(path: Path):
    """`direct_write.ChecksumWriter` for a save into `path` (files written past the page cache, each
    one's CRC-32 taken as it is written); None on a torch whose checkpoint writer it cannot extend
    (the SDK's 2.0), which then saves as torch does."""
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "save"):
        return None
    try:
        from .direct_write import ChecksumWriter
    except ImportError:
        return None
    return ChecksumWriter(path)


def background_group():
    """A gloo group of every process, for the collectives of checkpoints written in a background
    thread: beside the training steps' own collectives, never interleaved with them (and on the
    CPU, which torch.distributed.checkpoint's asynchronous save needs). Every process creates it
    together; None without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def host_stager():
    """What copies a state to host memory for `start_save`, keeping its host buffers from one
    checkpoint to the next (the first copy allocates them, later ones only copy: on the CPU about
    a third of the first's time), pinned for a GPU's copies; `close()` it after the last save.
    None on a torch without one (`start_save` then lets torch choose)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def start_save(state: Dict[str, Any], path: Path, group, stager=None) -> Future:
    """torch.distributed.checkpoint's asynchronous save of `state` (every process its share) on
    `group`, copied to host memory by `stager` (`host_stager`): returns once the tensors are
    copied, with a Future of what `transfer`'s save returns once the files are written. On a torch
    without `dcp.async_save` (the SDK's 2.0) the save is done here, in full."""
    import torch.distributed.checkpoint as dcp

    done: Future = Future()
    if not hasattr(dcp, "async_save"):
        done.set_result(transfer("save", state, path))
        return done
    writer = checksum_writer(path)
    kwargs: Dict[str, Any] = {"async_stager": stager} if stager is not None else {}
    kwargs.update({"storage_writer": writer} if writer is not None else {"checkpoint_id": str(path)})
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        upload = dcp.async_save(state, process_group=group, no_dist=group is None, **kwargs)

    def written(future: Future) -> None:
        error = future.exception()
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None if writer is None else writer.written)

    upload.add_done_callback(written)
    return done


def all_gather(obj: Any, group) -> List[Any]:
    """Every process's `obj`, in rank order, over `group` ([obj] without one)."""
    import torch.distributed as dist

    if group is None:
        return [obj]
    gathered: List[Optional[Any]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def metadata(path: Path) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every tensor a DCP directory holds, by name, read from its metadata alone."""
    stored = _reader()(str(path)).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in stored.state_dict_metadata.items() if hasattr(v, "size")}


def _reader():
    """torch.distributed.checkpoint's FileSystemReader; on a torch without `dcp.load` (the SDK's 2.0),
    one that also reads the metadata a newer torch wrote, which pickles the memory-format enum under a
    name 2.0 lacks and classes 2.0 does not use."""
    import torch.distributed.checkpoint as dcp

    if hasattr(dcp, "load"):
        return dcp.FileSystemReader

    class NewerMetadata(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except AttributeError:
                if name == "_MEM_FORMAT_ENCODING":
                    from torch.distributed._shard.sharded_tensor.metadata import MEM_FORMAT_ENCODING

                    return MEM_FORMAT_ENCODING
                return type(name, (), {})  # its fields are kept as attributes, unused by this torch

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):
            with (Path(self.path) / ".metadata").open("rb") as f:
                return NewerMetadata(f).load()

    return Reader
