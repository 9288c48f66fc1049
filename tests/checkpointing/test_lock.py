"""One writer per run directory: a live writer refuses a second one in one line, a killed one blocks
nobody, and one process (a notebook kernel) may build trainer after trainer for its directory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ipu_t5.checkpointing import lock
from ipu_t5.errors import UserError
from ipu_t5.training.trainer import T5Trainer

from tests.conftest import run_cli, subprocess_env, tiny_overrides

pytestmark = pytest.mark.core

TAKE = "import sys, time; from ipu_t5.checkpointing import lock; lock.acquire(sys.argv[1], 'holder'); " \
       "print('locked', flush=True); time.sleep(600)"
TRY = "import sys; from ipu_t5.checkpointing import lock; print(lock.acquire(sys.argv[1], 'second'))"


def _holder(directory):
    """A process that takes the lock on `directory` and sleeps; returned once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", TAKE, str(directory)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _train(out, *extra):
    return run_cli(["train"] + ["--set=" + s for s in tiny_overrides(out, **{
        "training.max_steps": 2, "validation.do_eval": "false"})] + list(extra))


def test_a_second_writer_is_refused_until_the_first_is_killed(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        refused = _train(out, "--resume", "auto")
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in refused.stderr
        assert "pid {} on host".format(holder.pid) in lines[0] and "being written by another run" in lines[0]
        assert not (out / "run_config.yaml").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The killed holder's record is still there; its lock died with it.
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == holder.pid
    proceeds = _train(out, "--resume", "auto")
    assert proceeds.returncode == 0, proceeds.stderr[-2000:]
    # Released when the command ended.
    assert (out / lock.LOCK_FILE).read_text() == ""


def test_a_trainer_holds_its_directory_until_closed(make_config, tmp_path):
    config = make_config(**{"training.max_steps": 2})
    first = T5Trainer(config)
    first.train()
    attempt = subprocess.run([sys.executable, "-c", TRY, str(config.output_dir)], env=subprocess_env(),
                             capture_output=True, text=True)
    assert "pid {} on host".format(os.getpid()) in attempt.stderr
    # The same process (a notebook kernel running its cells again) is not a second writer.
    again = T5Trainer(make_config(**{"training.max_steps": 3, "output.resume_from_checkpoint": "auto"}))
    assert again.train()["steps"] == 3
    first.close()
    assert lock.holder(config.output_dir)["pid"] == os.getpid()
    again.close()
    # Both closed: another process may write.
    attempt = subprocess.run([sys.executable, "-c", TRY, str(config.output_dir)], env=subprocess_env(),
                             capture_output=True, text=True)
    assert attempt.stdout.strip() == "True", attempt.stderr


def test_the_workers_of_a_launcher_run_under_its_lock(tmp_path):
    out = tmp_path / "run"
    with lock.for_workers(out, "launcher"):
        # A worker inherits the launcher's environment and takes nothing.
        worker = subprocess.run([sys.executable, "-c", TRY, str(out)], env=subprocess_env(), capture_output=True,
                                text=True)
        assert worker.stdout.strip() == "False", worker.stderr
        # Anyone else is refused.
        other = subprocess.run([sys.executable, "-c", TRY, str(out)],
                               env={k: v for k, v in subprocess_env().items() if k != lock.HELD_ENV},
                               capture_output=True, text=True)
        assert "being written by another run: pid {}".format(os.getpid()) in other.stderr
    assert lock.HELD_ENV not in os.environ
