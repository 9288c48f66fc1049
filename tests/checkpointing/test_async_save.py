"""Checkpoints written beside training (output.async_save): the same checkpoints as written in
place, resumed exactly; a run ends with its last one complete; a write cut short is invisible."""
import subprocess
import sys

import pytest

from ipu_t5 import checkpointing
from ipu_t5.layout import plan_from_config
from ipu_t5.training.trainer import T5Trainer
from tests.checkpointing.test_checkpoint import (assert_same_tensors, config_for, dcp_backend_class, straight,  # noqa: F401
                                                 train, weights)
from tests.conftest import ROOT, losses, subprocess_env

ASYNC = {"output.async_save": "true"}


def optimizer(path):
    view = checkpointing.inspect(path).optimizer_state()
    return {"{}.{}".format(name, field): value for name in view for field, value in view[name].items()}


def assert_same_checkpoint(a, b):
    assert_same_tensors(weights(a), weights(b))
    assert_same_tensors(optimizer(a), optimizer(b))


@pytest.mark.core
@pytest.mark.parametrize("backend", ["safetensors", "torch.distributed.checkpoint"])
def test_async_checkpoints_are_the_sync_ones_and_resume_exactly(straight, tmp_path, backend):  # noqa: F811
    """One process writing safetensors from host copies in a thread, or through
    torch.distributed.checkpoint's async_save as a sharded backend does: every checkpoint holds
    what the synchronous run's holds although training went on during its write, the run returns
    with its last checkpoint in place, and resuming the first one repeats the run exactly."""
    out = tmp_path / "run"
    config = config_for(out, **ASYNC)
    trainer = T5Trainer(config, backend=dcp_backend_class()(config, plan_from_config(config))) \
        if backend != "safetensors" else T5Trainer(config)
    trainer.train()
    assert checkpointing.list_steps(out) == [5, 10]
    for step in (5, 10):
        saved = checkpointing.inspect(checkpointing.step_path(out, step))
        assert saved.state["tensors"] == backend
        assert_same_checkpoint(saved.path, checkpointing.step_path(straight, step))
    assert not [p for p in checkpointing.checkpoints_dir(out).iterdir() if p.name.startswith(".")]
    trainer.close()

    again = tmp_path / "again"
    train(again, **dict(ASYNC, **{"output.resume_from_checkpoint": str(checkpointing.step_path(out, 5))})).close()
    assert losses(again) == {s: v for s, v in losses(straight).items() if s > 5}
    assert_same_checkpoint(checkpointing.step_path(again, 10), checkpointing.step_path(straight, 10))


# The process dies just before the checkpoint of step 10 would be renamed into place: every file
# written, the write not finished.
KILLED_BEFORE_RENAME = """
import os, sys
from ipu_t5.checkpointing import atomic
from ipu_t5.training.trainer import T5Trainer
from tests.checkpointing.test_checkpoint import config_for

replace_dir = atomic.replace_dir
def dies_at_step_10(new, target):
    if target.name == "step-10":
        os._exit(9)
    replace_dir(new, target)
atomic.replace_dir = dies_at_step_10
T5Trainer(config_for(sys.argv[1], **{"output.async_save": "true"})).train()
"""


def test_a_process_killed_during_an_async_write_leaves_the_previous_checkpoint_newest(straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # This process's thread count (no OMP_NUM_THREADS=1 here), so its steps round as `straight`'s did.
    done = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(out)], cwd=str(ROOT),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-3000:]
    assert (checkpointing.step_path(out, 10) / checkpointing.STATE_FILE).exists() is False
    # The complete staging directory is there, hidden; the newest intact checkpoint is step 5.
    assert [p for p in checkpointing.checkpoints_dir(out).iterdir() if p.name.startswith(".step-10")]
    assert checkpointing.list_steps(out) == [5]
    assert checkpointing.newest_usable(out, print).step == 5
    train(out, **dict(ASYNC, **{"output.resume_from_checkpoint": "auto"})).close()
    assert losses(out) == losses(straight)
    assert_same_checkpoint(checkpointing.step_path(out, 10), checkpointing.step_path(straight, 10))
    assert not [p for p in checkpointing.checkpoints_dir(out).iterdir() if p.name.startswith(".")]


@pytest.mark.core
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_writer_threads_yield_to_the_training_threads():
    """The writing thread's nice value is lowered, the training thread's is left as it was."""
    import os
    import threading

    from ipu_t5.checkpointing.background import WRITER_NICE, lower_priority

    found, ready, release = {}, threading.Event(), threading.Event()

    def writer():
        found["id"] = threading.get_native_id()
        ready.set()
        release.wait()

    thread = threading.Thread(target=writer)
    thread.start()
    ready.wait()
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        lower_priority(found["id"])
        assert os.getpriority(os.PRIO_PROCESS, found["id"]) == max(WRITER_NICE, main)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    finally:
        release.set()
        thread.join()


@pytest.mark.core
def test_the_host_buffers_are_made_after_the_first_step_and_reused_by_every_checkpoint(tmp_path, monkeypatch):
    """With output.async_save, a sharded backend's host buffers are allocated once, right after the
    first step (when AdamW's moments exist), not at the first checkpoint's step: the checkpoint's
    copy lands in those same buffers."""
    import torch

    from ipu_t5.checkpointing import dcp

    probe = dcp.host_stager()
    if probe is None:
        pytest.skip("torch {} has no stager that keeps host buffers: its checkpoints are written in full at their "
                    "step".format(torch.__version__))
    probe.close()
    out = tmp_path / "run"
    config = config_for(out, **ASYNC)
    trainer = T5Trainer(config, backend=dcp_backend_class()(config, plan_from_config(config)))
    made_at, copies = [], []
    real = dcp.host_stager

    def recording_stager():
        stager = real()
        made_at.append(trainer.step)
        stage = stager.stage

        def staged(state, **kwargs):
            copy = stage(state, **kwargs)
            copies.append((trainer.step, {k: t.data_ptr() for k, t in dcp.flat_shares(copy)}))
            return copy

        stager.stage = staged
        return stager

    monkeypatch.setattr(dcp, "host_stager", recording_stager)
    trainer.train()
    assert made_at == [1]
    assert [step for step, _ in copies] == [1, 5, 10]
    first = copies[0][1]
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq") for k in first)
    assert all(buffers == first for _, buffers in copies[1:])
    trainer.close()


@pytest.mark.core
def test_one_process_copies_into_the_same_host_buffers_from_the_first_step_on(tmp_path, monkeypatch):
    """One process with output.async_save copies its weights and AdamW's moments into host memory
    made right after the first step, and every checkpoint's copy lands in that same memory (the
    checkpoints themselves equal the synchronous run's: the test above)."""
    out = tmp_path / "run"
    trainer = T5Trainer(config_for(out, **ASYNC))
    copies = []
    real = checkpointing.BackgroundSave.host_copies

    def recording(saves, tensors):
        copy = real(saves, tensors)
        copies.append((trainer.step, {(f, k): t.data_ptr() for f, part in copy.items() for k, t in part.items()}))
        live = {t.data_ptr() for part in tensors.values() for t in part.values()}
        assert not live & set(copies[-1][1].values()), "a host copy shares memory with the live state"
        return copy

    monkeypatch.setattr(checkpointing.BackgroundSave, "host_copies", recording)
    trainer.train()
    assert [step for step, _ in copies] == [1, 5, 10]
    first = copies[0][1]
    assert any(f == checkpointing.OPTIMIZER_FILE and k.endswith("exp_avg_sq") for f, k in first)
    assert all(buffers == first for _, buffers in copies[1:])
    trainer.close()
