"""Checkpoints written beside training (`output.async_save`): the training loop pays only the copy
of its state to host memory; the files are written, checksummed and put in place by a thread while
the next steps run.

What a checkpoint guarantees does not change: it is written under a hidden staging name and
renamed into place only once complete (`atomic`), so a process killed during the write leaves the
previous checkpoint the newest intact one. A sharded backend's processes write through
torch.distributed.checkpoint's `async_save`, whose collectives (and the manifest's) run on a gloo
group of their own, apart from the training steps' collectives (torchtitan does the same).
"""
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..errors import UserError
from . import atomic, dcp
from .format import SHARDED_DIR

# The nice value of the threads that write (Linux keeps one per thread): on a host whose cores the
# training processes keep busy (CPU ranks, or a GPU host's few cores), the write takes the time the
# steps leave idle, such as a pipeline's bubbles, instead of a share of theirs.
WRITER_NICE = 19
# The thread torch.distributed.checkpoint's asynchronous save writes in (its executor's name).
DCP_WRITER_PREFIX = "AsyncCheckpointExecutor"

# What `save.save_checkpoint` hands over: the main process's last part (files beside the tensors,
# the rename into place), and the cleanup of a failed write (returns the error to raise).
Finish = Callable[[Dict[str, Dict[str, object]]], None]
Failed = Callable[[BaseException], BaseException]


class BackgroundSave:
    """At most one checkpoint in flight, for one trainer: `save.save_checkpoint(...,
    background=self)` starts it, `wait` finishes it; `close` when the trainer closes."""

    def __init__(self) -> None:
        self._pending: Optional[Future] = None
        self._backend: Any = None
        self._group: Any = None
        self._stager: Any = None
        self._host: Dict[str, Dict[str, Any]] = {}

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def prepare(self, backend, one_process: Callable[[], Dict[str, Dict[str, Any]]]) -> None:
        """Every process, once its optimizer state exists (after the first step): create the writes'
        process group and host buffers now (the copy taken here is discarded), so that no
        checkpoint's step pays for allocating them: on the development VM, 0.7 to 0.9 s of each
        process's loop for 768 MB of new memory, and the first checkpoint's steps about 1.6x an
        ordinary one against 1.2x for later ones. `one_process`: what a one-process backend's
        checkpoint holds (`save.one_process_tensors`), for its buffers (`host_copies`)."""
        if self._pending is not None:
            return
        shares = backend.checkpoint_state()
        if shares is None:
            if not self._host:
                self.host_copies(one_process())
            return
        if self._stager is None and self._sharded_writes() is not None:
            self._stager.stage(shares)

    def _sharded_writes(self) -> Any:
        """The gloo group the writes run on and the stager of their host buffers, made on first
        use; returns the stager (None on a torch without one)."""
        if self._group is None:
            self._group = dcp.background_group()
        if self._stager is None:
            self._stager = dcp.host_stager()
        return self._stager

    def host_copies(self, tensors: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """One process: copies of `tensors` ({file: {name: tensor}}) that the steps after this one do
        not change while they are written, in host memory kept from one checkpoint to the next (new
        only for a name not seen before or whose shape or dtype changed): the loop pays a copy, not
        the mapping of fresh memory, which costs more than the copy itself on the development VM."""
        if self._pending is not None:
            raise RuntimeError("a checkpoint is still being written from the host copies: wait() for it first")
        kept = self._host
        self._host = {file: {name: _copy_into(kept.get(file, {}).get(name), tensor) for name, tensor in part.items()}
                      for file, part in tensors.items()}
        return self._host

    def start(self, backend, shares: Optional[Dict[str, Any]], staging: Path, finish: Finish,
              failed: Failed) -> None:
        """Every process: copy `shares` (a sharded backend's live state; None: one process, whose
        tensors `finish` writes from host copies already made) to host memory, then write them
        into `staging` and `finish` there on the main process, in a thread."""
        if self._pending is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it first")
        upload = None
        if shares is not None:
            stager = self._sharded_writes()
            upload = dcp.start_save(shares, staging / SHARDED_DIR, self._group, stager)
            for thread in threading.enumerate():
                if thread.name.startswith(DCP_WRITER_PREFIX):
                    lower_priority(thread.native_id)
        done: Future = Future()
        index, count, group, main = backend.process_index, backend.num_processes, self._group, backend.is_main_process

        def write() -> None:
            lower_priority(threading.get_native_id())
            try:
                written: Dict[str, Dict[str, object]] = {}
                if upload is not None:
                    written = atomic.sharded_manifest(staging, index, count, lambda part: dcp.all_gather(part, group),
                                                      upload.result())
            except BaseException as err:
                done.set_exception(failed(err))
                return
            try:
                if main:
                    finish(written)  # cleans up after itself
            except BaseException as err:
                done.set_exception(err)
                return
            done.set_result(None)

        threading.Thread(target=write, name="ipu-t5-checkpoint-write", daemon=True).start()
        self._pending, self._backend = done, backend

    def wait(self) -> None:
        """Every process: block until the checkpoint in flight (if any) is in place. A write that
        failed on any process raises on every process (its one line, for a UserError such as a
        full disk), so none trains on while another stops."""
        if self._pending is None:
            return
        pending, backend = self._pending, self._backend
        self._pending = None
        error = pending.exception()
        found = backend.gather_object(None if error is None else (isinstance(error, UserError), str(error)))
        if error is not None:
            raise error
        first = next((f for f in found if f is not None), None)
        if first is not None:
            user_error, message = first
            raise (UserError if user_error else RuntimeError)(message)

    def close(self) -> None:
        """Forget a write still in flight (a run ended by an error or a second signal, whose peers
        may be gone): it ends in place, or invisible if the process exits first. The host buffers
        are freed once no write uses them."""
        self._pending = None
        self._host = {}
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def _copy_into(buffer: Any, tensor: Any) -> Any:
    """`tensor`'s values in host memory: in `buffer` where it has the same shape and dtype."""
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return buffer.copy_(tensor)


def lower_priority(thread_id) -> None:
    """Give one thread of this process (its native id) the nice value `WRITER_NICE`: Linux's
    `setpriority` on a thread id applies to that thread alone. Elsewhere, or where not allowed,
    the thread keeps its priority."""
    if not thread_id or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, max(WRITER_NICE, os.getpriority(os.PRIO_PROCESS, thread_id)))
    except OSError:
        pass
