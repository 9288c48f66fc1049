"""Runs that heal themselves: with --max-restarts, a 2 x 2 run whose rank is killed restarts every
rank, continues from its newest checkpoint and ends as the uninterrupted run ends, bit for bit;
used-up restarts end in the launcher's one-line report."""
import argparse
import json
import re
import signal
import subprocess
import sys

import pytest

from ipu_t5 import checkpointing
from tests.backends.torch_distributed.test_pipeline import _rank_process, _wait_for_a_checkpoint
from tests.checkpointing.test_checkpoint import assert_same_tensors, weights
from tests.conftest import ROOT, losses, run_cli, subprocess_env

STEPS, SAVE_STEPS = 12, 4


def _args(out):
    return ["train", "--model", "tiny", "--stages", "2", "--replicas", "2", "--max-steps", str(STEPS),
            "--save-every", str(SAVE_STEPS), "--output-dir", str(out), "--set", "output.report_to_tensorboard=false",
            "--set", "validation.do_eval=false", "--set", "data.demo_train_samples=200",
            "--set", "training.global_batch_size=8"]


def _optimizer(path):
    view = checkpointing.inspect(path).optimizer_state()
    return {"{}.{}".format(name, field): value for name in view for field, value in view[name].items()}


@pytest.mark.slow
def test_a_killed_rank_restarts_the_run_which_ends_as_the_uninterrupted_one(tmp_path):
    """kill -9 of rank 0 (the one that writes) once a checkpoint exists, at whatever step the run has
    reached: torchrun restarts every rank, they continue from the newest intact checkpoint by
    themselves, and the run exits 0 with every loss and the final weights and optimizer state of
    the uninterrupted run, recomputing at most SAVE_STEPS steps. Its checkpoints are written
    asynchronously, the straight run's in place."""
    straight = tmp_path / "straight"
    done = run_cli(_args(straight), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    out = tmp_path / "restarted"
    with open(str(tmp_path / "stdout"), "w") as stdout_file, open(str(tmp_path / "stderr"), "w") as stderr_file:
        # Its checkpoints written beside training (torch.distributed.checkpoint's async_save on a
        # group of their own): the same checkpoints, bit for bit, as the straight run's in place.
        proc = subprocess.Popen([sys.executable, "-m", "ipu_t5"] + _args(out) + [
                                    "--max-restarts", "2", "--set", "output.async_save=true"],
                                cwd=str(ROOT), stdout=stdout_file, stderr=stderr_file,
                                env=subprocess_env(OMP_NUM_THREADS="1"))
        try:
            _wait_for_a_checkpoint(proc, out)
            _rank_process(proc, 0).send_signal(signal.SIGKILL)
            # Rank 0 wrote the metrics: the last step the first attempt finished.
            reached = max(losses(out))
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-4000:]

    events = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" in r]
    assert len(events) == 1 and events[0]["event"] == "restart" and events[0]["restart"] == 1, events
    resumed = events[0]["resumed_from_step"]
    assert resumed % SAVE_STEPS == 0 and 0 < resumed <= reached
    assert reached + 1 - resumed <= SAVE_STEPS
    shown = re.search(r"ipu-t5: restart 1 after a failed process: continuing from step (\d+) \((\S+)\)",
                      stdout + stderr)
    assert shown and int(shown.group(1)) == resumed, (stdout + stderr)[-3000:]
    assert shown.group(2) == str(checkpointing.step_path(out, resumed))

    # Every step once (losses() refuses a step logged twice), each loss exactly the uninterrupted one's.
    assert losses(out) == losses(straight)
    # The last periodic checkpoint (written asynchronously) and the final one (in place).
    for step in (STEPS - SAVE_STEPS, STEPS):
        found, expected = checkpointing.step_path(out, step), checkpointing.step_path(straight, step)
        assert_same_tensors(weights(found), weights(expected))
        assert_same_tensors(_optimizer(found), _optimizer(expected))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["standalone", "static"])
def test_used_up_restarts_end_in_the_one_line_report(tmp_path, rendezvous):
    """A rank that fails in every attempt, after its group has connected: the restarted ranks connect
    again (under a static rendezvous too, whose store outlives the attempts), and after the one
    restart allowed the launcher prints its one line, as without restarts."""
    flags = ["--max-restarts", "1"]
    if rendezvous == "static":
        flags += ["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    code = ("import argparse, sys; from pathlib import Path; "
            "from ipu_t5.backends.torch_distributed.launch import add_cluster_flags, launch; "
            "p = argparse.ArgumentParser(); add_cluster_flags(p); "
            "sys.exit(launch(3, ['fail'], p.parse_args({!r}), "
            "module='tests.backends.torch_distributed.failing_worker', log_dir=Path({!r})))".format(flags, str(tmp_path)))
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "ipu-t5: error: the input file is missing (rank 1)"
    assert sorted(p.name for p in tmp_path.glob("*/attempt_*")) == ["attempt_0", "attempt_1"]


@pytest.mark.core
def test_max_restarts_reaches_torchrun_in_every_rendezvous():
    from ipu_t5.backends.torch_distributed.launch import add_cluster_flags, torchrun_args
    from ipu_t5.errors import UserError

    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    for flags in ([], ["--nnodes", "2", "--rdzv-endpoint", "head:29400"],
                  ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]):
        command = torchrun_args(4, parser.parse_args(flags + ["--max-restarts", "3"]))
        assert command[command.index("--max-restarts") + 1] == "3"
        assert torchrun_args(4, parser.parse_args(flags))[command.index("--max-restarts") + 1] == "0"
    with pytest.raises(UserError, match="--max-restarts must be 0 or more, got -1"):
        torchrun_args(4, parser.parse_args(["--max-restarts", "-1"]))


@pytest.mark.core
def test_a_restarted_worker_continues_its_own_run(tmp_path, make_config, monkeypatch):
    """Restarted (TORCHELASTIC_RESTART_COUNT > 0), a worker continues from the run's checkpoints when
    it has written some, else where the first attempt started; never from another run's."""
    from ipu_t5.backends.torch_distributed.launch import restart_count, resume_after_restart
    from ipu_t5.checkpointing import run_dir

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2
    config = make_config(tmp_path / "run", **{"output.resume_from_checkpoint": str(tmp_path / "elsewhere")})
    assert resume_after_restart(config) == str(tmp_path / "elsewhere")
    run_dir.claim(config.output_dir, config.to_dict(), False)
    checkpointing.step_path(config.output_dir, 4).mkdir(parents=True)
    (checkpointing.step_path(config.output_dir, 4) / checkpointing.STATE_FILE).write_text("{}")
    assert resume_after_restart(config) == "auto"
    other = make_config(tmp_path / "run", **{"training.seed": 7, "output.overwrite_output_dir": "true"})
    assert resume_after_restart(other) is None
    monkeypatch.delenv("RANK")
    assert restart_count() == 0


@pytest.mark.core
def test_a_restart_before_the_first_checkpoint_starts_over_the_failed_attempts_output(make_config):
    """No checkpoint yet: the restarted run starts from step 0 over its own first attempt's output
    (not refused as a restart over checkpoints, nor as another run), and metrics.jsonl keeps each
    step once, after the restart's record."""
    import json

    from ipu_t5.training.trainer import T5Trainer

    values = {"training.max_steps": 3, "output.save_steps": "null", "validation.do_eval": "false"}
    first = T5Trainer(make_config(**values))
    first.train()
    first.close()
    before = losses(first.output_dir)
    config = make_config(**values)
    config.output.resume_from_checkpoint = None  # what resume_after_restart gives without checkpoints
    again = T5Trainer(config)
    again.record_restart(1)
    again.train()
    again.close()
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"event": "restart", "restart": 1, "step": 0, "resumed_from_step": 0}
    assert [r["step"] for r in records[1:]] == [1, 2, 3]
    assert losses(config.output_dir) == before
