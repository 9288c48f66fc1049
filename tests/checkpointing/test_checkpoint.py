"""Checkpoints: exact resume, preemption by signal, damaged checkpoints, full disks, other layouts."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipu_t5 import __version__, checkpointing
from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.training.trainer import T5Trainer

from tests.conftest import ROOT, losses, run_cli, subprocess_env, tiny_overrides

# One thread per process: on a machine shared with other work, OpenMP threads that wait on busy
# cores make CPU steps many times slower. Results do not depend on it.
ENV = {"OMP_NUM_THREADS": "1"}


def config_for(output_dir, **values):
    settings = {"validation.do_eval": "false", "output.save_steps": 5, "training.max_steps": 10}
    settings.update(values)
    return load_config("tiny", overrides=tiny_overrides(output_dir, **settings))


def train(output_dir, **values) -> T5Trainer:
    trainer = T5Trainer(config_for(output_dir, **values))
    trainer.train()
    return trainer


def snapshot(directory) -> dict:
    """Every file under `directory` with its size, modification time and content."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def weights(path) -> dict:
    """A checkpoint's stored weights (either tensor format), without the tied aliases."""
    from ipu_t5.models import TIED_ALIASES

    view = checkpointing.inspect(path).model_tensors()
    return {k: view[k] for k in view if k not in TIED_ALIASES}


def assert_same_tensors(a: dict, b: dict, exact=True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Ten uninterrupted steps with checkpoints at 5 and 10: the run every resume must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out)
    return out


# ----- exact resume -----

@pytest.mark.core
def test_resume_after_a_truncated_checkpoint_falls_back_and_reproduces_the_run(straight, tmp_path, capsys):
    """kill -9 during a write, simulated by truncating the newest checkpoint's weights: --resume
    auto says so, continues from the previous one, and repeats the uninterrupted run exactly."""
    out = tmp_path / "run"
    shutil.copytree(str(straight), str(out))
    damaged = checkpointing.step_path(out, 10) / checkpointing.MODEL_FILE
    size = damaged.stat().st_size
    with open(str(damaged), "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    trainer = T5Trainer(config_for(out, **{"output.resume_from_checkpoint": "auto"}))
    said = capsys.readouterr()
    message = said.out + said.err
    assert "step-10 is unusable: model.safetensors has {} bytes, {} were written".format(size // 2, size) in message
    assert "Falling back to the previous good checkpoint, {}".format(checkpointing.step_path(out, 5)) in message
    assert trainer.step == 5
    trainer.train()
    assert losses(out) == losses(straight)
    assert_same_tensors(weights(checkpointing.step_path(out, 10)), weights(checkpointing.step_path(straight, 10)))
    assert_same_tensors(load_file(str(checkpointing.step_path(out, 10) / checkpointing.OPTIMIZER_FILE)),
                        load_file(str(checkpointing.step_path(straight, 10) / checkpointing.OPTIMIZER_FILE)))


@pytest.mark.core
def test_resume_restores_random_streams(tmp_path):
    """With dropout on, the masks after a resume are those the uninterrupted run drew."""
    values = {"model.dropout_rate": 0.1, "training.max_steps": 6, "output.save_steps": 3}
    reference = tmp_path / "reference"
    train(reference, **values)
    resumed = tmp_path / "resumed"
    train(resumed, **dict(values, **{"training.max_steps": 3}))
    train(resumed, **dict(values, **{"output.resume_from_checkpoint": "auto"}))
    assert losses(resumed) == losses(reference)
    assert_same_tensors(weights(checkpointing.step_path(resumed, 6)), weights(checkpointing.step_path(reference, 6)))


@pytest.mark.core
def test_checkpoints_load_under_another_micro_batch_split(tmp_path):
    """Stored by name, a checkpoint continues under another split of the batch: gradient
    accumulation 4 then 1 (and 1 then 4) gives the uninterrupted run's losses and weights, up to
    float rounding of the summation order."""
    # Learning rate 1e-4: Adam turns rounding in near-zero gradients into updates of a fraction of
    # the learning rate, which at 1e-3 grows past the comparison within ten steps.
    lr = {"training.learning_rate": 1e-4}
    straight = tmp_path / "straight"
    train(straight, **lr)
    first = tmp_path / "accumulate-4-then-1"
    train(first, **{"training.max_steps": 5, "layout.gradient_accumulation_steps": 4}, **lr)
    train(first, **{"output.resume_from_checkpoint": str(checkpointing.step_path(first, 5))}, **lr)
    second = tmp_path / "accumulate-1-then-4"
    train(second, **{"layout.gradient_accumulation_steps": 4,
                     "output.resume_from_checkpoint": str(checkpointing.step_path(straight, 5))}, **lr)
    expected = losses(straight)
    assert sorted(losses(first)) == sorted(expected)
    assert list(losses(second)) == list(range(6, 11))
    # Each micro-batch pads to its own longest prompt, so the splits run matmuls of other shapes.
    for run in (first, second):
        for step, loss in losses(run).items():
            assert loss == pytest.approx(expected[step], rel=1e-5), (run.name, step)
        assert_same_tensors(weights(checkpointing.step_path(run, 10)), weights(checkpointing.step_path(straight, 10)),
                            exact=False)


# ----- signals (real subprocesses) -----

def cli_args(output_dir, *extra, **values):
    settings = {"validation.do_eval": "false", "output.save_steps": 5, "training.max_steps": 20}
    settings.update(values)
    return ["train", "--model", "tiny"] + [a for s in tiny_overrides(output_dir, **settings)
                                           for a in ("--set", s)] + list(extra)


def start(args, stderr_path):
    return subprocess.Popen([sys.executable, "-m", "ipu_t5"] + args, cwd=str(ROOT), env=subprocess_env(**ENV), text=True,
                            stdout=subprocess.PIPE, stderr=open(str(stderr_path), "w"))


def wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could signal it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def train_steps_logged(output_dir) -> int:
    path = Path(output_dir) / "metrics.jsonl"
    return sum('"lr"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """20 steps straight; then 20 steps stopped by SIGTERM after about 10 and resumed with
    --resume auto: the same loss at every step and the same final weights and optimizer."""
    straight = tmp_path / "straight"
    done = run_cli(cli_args(straight), env=ENV)
    assert done.returncode == 0, done.stderr

    stopped = tmp_path / "stopped"
    process = start(cli_args(stopped), tmp_path / "stderr.txt")
    wait_for(lambda: train_steps_logged(stopped) >= 10, process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 0, err
    assert "SIGTERM received: finishing this step, then writing a checkpoint" in err
    step = train_steps_logged(stopped)
    assert 10 <= step < 20
    assert "stopped by SIGTERM after step {} of 20; checkpoint {}".format(
        step, checkpointing.step_path(stopped, step)) in out + err
    resume_line = [line for line in out.splitlines() if line.startswith("ipu-t5: resume with: ")]
    assert resume_line and resume_line[0].endswith("--resume auto")
    assert not (stopped / "hf").exists()

    resumed = run_cli(cli_args(stopped, "--resume", "auto"), env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from {} at step {}".format(checkpointing.step_path(stopped, step), step) in resumed.stdout + resumed.stderr
    assert losses(stopped) == losses(straight)
    for name in (checkpointing.MODEL_FILE, checkpointing.OPTIMIZER_FILE):
        assert_same_tensors(load_file(str(checkpointing.step_path(stopped, 20) / name)),
                            load_file(str(checkpointing.step_path(straight, 20) / name)))
    assert_same_tensors(load_file(str(stopped / "hf" / "model.safetensors")),
                        load_file(str(straight / "hf" / "model.safetensors")))


@pytest.mark.slow
def test_second_signal_exits_at_once_and_leaves_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    # Large steps, so the second signal lands while the first is still being honoured.
    process = start(cli_args(out, **{"training.global_batch_size": 128, "training.max_steps": 200,
                                     "output.save_steps": 2}), tmp_path / "stderr.txt")
    last = checkpointing.step_path(out, 2)
    wait_for(lambda: (last / checkpointing.STATE_FILE).is_file() and train_steps_logged(out) >= 3, process)
    before = snapshot(last)
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in (tmp_path / "stderr.txt").read_text(), process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "second SIGTERM: exiting now" in err
    assert snapshot(last) == before
    checkpointing.inspect(last)
    assert checkpointing.list_steps(out) == [2]


@pytest.mark.core
def test_signal_during_validation_checkpoints_and_the_resumed_run_validates_first(tmp_path):
    """A validation can take long on a large model: a signal stops it between batches, the step is
    checkpointed, and the resumed run repeats that validation before training on."""
    out = tmp_path / "run"
    values = {"validation.do_eval": "true", "validation.eval_steps": 3, "validation.per_device_eval_batch_size": 16,
              "training.max_steps": 6, "output.save_steps": 100}
    trainer = T5Trainer(config_for(out, **values))
    generate = trainer.backend.generate

    def signalled(samples, max_new_tokens):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate(samples, max_new_tokens)

    trainer.backend.generate = signalled
    summary = trainer.train()
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] == 3
    assert checkpointing.list_steps(out) == [3]
    assert checkpointing.inspect(checkpointing.step_path(out, 3)).state["last_eval_step"] is None
    resumed = T5Trainer(config_for(out, **dict(values, **{"output.resume_from_checkpoint": "auto"})))
    resumed.train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "accuracy" in r] == [3]
    assert checkpointing.inspect(checkpointing.step_path(out, 3)).state["last_eval_step"] == 3
    assert resumed.step == 6


@pytest.mark.core
def test_graceful_stop_handler():
    """First signal: a request; second: os._exit(128 + signal) with no cleanup."""
    from ipu_t5.training import signals

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    before = signal.getsignal(signal.SIGINT)  # ignored where the suite runs as a background job
    with signals.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        real_exit = signals.os._exit
        signals.os._exit = fake_exit
        try:
            with pytest.raises(Exited) as exited:
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            signals.os._exit = real_exit
    assert exited.value.args == (128 + signal.SIGTERM,)
    assert signal.getsignal(signal.SIGINT) is before


# ----- damaged or unfitting checkpoints -----

def damage(path: Path, case: str) -> None:
    if case == "truncated":
        with open(str(path / checkpointing.OPTIMIZER_FILE), "r+b") as f:
            f.truncate(100)
    elif case == "corrupt":
        with open(str(path / checkpointing.MODEL_FILE), "r+b") as f:
            f.seek(-16, os.SEEK_END)
            f.write(b"\xff" * 16)
    elif case == "incomplete":
        (path / checkpointing.STATE_FILE).unlink()
    elif case == "garbled-state":
        text = (path / checkpointing.STATE_FILE).read_text()
        (path / checkpointing.STATE_FILE).write_text(text[:len(text) // 2])
    elif case == "newer-format":
        state = json.loads((path / checkpointing.STATE_FILE).read_text())
        state["format_version"] = 99
        (path / checkpointing.STATE_FILE).write_text(json.dumps(state))


DAMAGE = {
    "truncated": "optimizer.safetensors has 100 bytes",
    "corrupt": "model.safetensors is corrupt (CRC-32",
    "incomplete": "it has no trainer_state.json (it was not completely written",
    "garbled-state": "trainer_state.json is not valid JSON",
    "newer-format": "it is in checkpoint format 99 (written by ipu-t5 {v}) but this ipu-t5 {v} reads format 1".format(
        v=__version__),
}


@pytest.mark.core
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_before_anything_is_written(straight, tmp_path, case):
    out = tmp_path / "run"
    shutil.copytree(str(straight), str(out))
    bad = checkpointing.step_path(out, 10)
    damage(bad, case)
    before = snapshot(out)
    with pytest.raises(UserError) as error:
        T5Trainer(config_for(out, **{"output.resume_from_checkpoint": str(bad)}))
    assert "checkpoint {} is unusable: {}".format(bad, DAMAGE[case]) in str(error.value)
    assert snapshot(out) == before


@pytest.mark.core
def test_auto_resume_with_every_checkpoint_damaged_says_which_and_why(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(str(straight), str(out))
    damage(checkpointing.step_path(out, 10), "truncated")
    damage(checkpointing.step_path(out, 5), "corrupt")
    before = snapshot(out)
    with pytest.raises(UserError) as error:
        T5Trainer(config_for(out, **{"output.resume_from_checkpoint": "auto"}))
    message = str(error.value)
    assert message.startswith("no usable checkpoint in {}".format(checkpointing.checkpoints_dir(out)))
    assert "step-10 is unusable: optimizer.safetensors has 100 bytes" in message
    assert "step-5 is unusable: model.safetensors is corrupt" in message
    assert snapshot(out) == before


@pytest.mark.core
def test_checkpoint_of_another_model_size_is_refused(straight, tmp_path):
    """Found before any weights are built or downloaded: the message names the size that fits."""
    path = checkpointing.step_path(straight, 10)
    config = load_config("small", overrides=tiny_overrides(tmp_path / "run", **{
        "output.resume_from_checkpoint": str(path), "validation.do_eval": "false"}))
    with pytest.raises(UserError) as error:
        T5Trainer(config)
    message = str(error.value)
    assert "checkpoint {} holds another model than this run's 'small'".format(path) in message
    assert "d_model 128 (run: 512)" in message and "resume with --model tiny" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.core
def test_checkpoint_of_other_data_is_refused(straight, tmp_path):
    path = checkpointing.step_path(straight, 10)
    with pytest.raises(UserError) as error:
        T5Trainer(config_for(tmp_path / "run", **{"output.resume_from_checkpoint": str(path),
                                                  "training.global_batch_size": 8}))
    assert "continues a data order over other data: global_batch_size 16 (now 8)" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.core
def test_checkpoint_with_missing_weights_is_refused(straight, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(str(checkpointing.step_path(straight, 10)), str(path))
    tensors = weights(path)
    del tensors["lm_head.weight"]
    # Rewritten with a matching manifest, as a checkpoint from a buggy writer would be.
    from safetensors.torch import save_file

    save_file(tensors, str(path / checkpointing.MODEL_FILE))
    state = json.loads((path / checkpointing.STATE_FILE).read_text())
    with open(str(path / checkpointing.MODEL_FILE), "rb") as f:
        from ipu_t5.checkpointing.atomic import file_crc32

        state["files"][checkpointing.MODEL_FILE] = {"bytes": path.joinpath(checkpointing.MODEL_FILE).stat().st_size,
                                                 "crc32": file_crc32(f)}
    (path / checkpointing.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UserError) as error:
        T5Trainer(config_for(tmp_path / "run", **{"output.resume_from_checkpoint": str(path)}))
    assert "does not fit this model: 1 weight(s) missing (e.g. lm_head.weight)" in str(error.value)


@pytest.mark.core
def test_resume_auto_without_checkpoints_starts_afresh(tmp_path, capsys):
    trainer = T5Trainer(config_for(tmp_path / "run", **{"output.resume_from_checkpoint": "auto"}))
    assert trainer.step == 0
    said = capsys.readouterr()
    assert "no checkpoint in {} yet: starting from step 0".format(
        checkpointing.checkpoints_dir(tmp_path / "run")) in said.out + said.err


@pytest.mark.core
def test_starting_afresh_over_checkpoints_needs_overwrite(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(str(straight), str(out))
    before = snapshot(out)
    with pytest.raises(UserError) as error:
        train(out)
    assert "holds checkpoints of this run up to step 10: continue it with --resume auto, or start it over " \
           "with --overwrite" in str(error.value)
    assert snapshot(out) == before
    train(out, **{"training.max_steps": 3, "output.save_steps": 1, "output.overwrite_output_dir": "true"})
    assert checkpointing.list_steps(out) == [2, 3]
    assert sorted(losses(out)) == [1, 2, 3]


# ----- full disk -----

@pytest.mark.core
@pytest.mark.parametrize("where", ["while writing", "checked before writing"])
def test_full_disk_names_path_and_bytes_and_keeps_the_previous_checkpoint(straight, tmp_path, monkeypatch, where):
    from ipu_t5.checkpointing import atomic

    out = tmp_path / "run"
    shutil.copytree(str(straight), str(out))
    trainer = T5Trainer(config_for(out, **{"output.resume_from_checkpoint": "auto", "training.max_steps": 11}))
    previous = checkpointing.step_path(out, 10)
    before = snapshot(previous)
    tensors = list(weights(previous).values()) + list(
        checkpointing.flatten_optimizer_state(trainer.backend.optimizer_state_dict()).values())
    needed = sum(t.numel() * t.element_size() for t in tensors)
    if where == "while writing":
        import errno

        from ipu_t5.checkpointing.checksum_file import ChecksumFile

        def full_disk(f, size):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ChecksumFile, "_write_out", full_disk)
    else:
        real = atomic.shutil.disk_usage
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(UserError) as error:
        trainer.train()
    target = checkpointing.step_path(out, 11)
    message = str(error.value)
    assert "no space left on the device while writing the checkpoint {}: it needs about".format(target) in message
    assert "({} bytes)".format(needed) in message
    assert "the previous checkpoint {} is intact".format(previous) in message
    assert not target.exists()
    assert not [p for p in checkpointing.checkpoints_dir(out).iterdir() if p.name.startswith(".")]
    assert snapshot(previous) == before
    checkpointing.inspect(previous)


# ----- what is kept -----

@pytest.mark.core
def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in range(1, 7):
        path = checkpointing.step_path(tmp_path, step)
        path.mkdir(parents=True)
        (path / checkpointing.STATE_FILE).write_text("{}")
    (checkpointing.checkpoints_dir(tmp_path) / "step-9").mkdir()  # incomplete: not a checkpoint, left alone
    assert checkpointing.rotate(tmp_path, keep=2, protect=[3]) == [1, 2, 4]
    assert sorted(p.name for p in checkpointing.checkpoints_dir(tmp_path).iterdir()) == ["step-3", "step-5", "step-6", "step-9"]


@pytest.mark.core
def test_training_keeps_last_checkpoints_and_the_best_validation(tmp_path):
    out = tmp_path / "run"
    trainer = train(out, **{"validation.do_eval": "true", "validation.eval_steps": 2, "training.max_steps": 8,
                            "output.save_steps": 3, "output.save_total_limit": 1})
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = {r["step"]: r["accuracy"] for r in evals if "accuracy" in r}
    assert sorted(accuracies) == [2, 4, 6]
    best = max(sorted(accuracies), key=lambda s: (accuracies[s], -s))
    assert (trainer.best.metric, trainer.best_metric, trainer.best_step) == ("accuracy", accuracies[best], best)
    assert checkpointing.list_steps(out) == sorted({best, 8})
    final = checkpointing.inspect(checkpointing.step_path(out, 8)).state
    assert final["best"] == trainer.best.state_dict()
    assert final["step"] == 8 and final["data_order"] == trainer.order.state_dict()


# ----- sharded (torch.distributed.checkpoint) checkpoints -----

def dcp_backend_class():
    """The single-process backend saving through torch.distributed.checkpoint, as a sharded
    (pipeline or FSDP) backend does: the checkpoint_state / load_checkpoint_state contract, with
    this process holding every share."""
    from ipu_t5.backends.single import SingleProcessBackend

    class DcpSingleProcessBackend(SingleProcessBackend):
        # State a device keeps for itself (as an IPU keeps its random generator), for extra_state.
        steps_run = 0

        def train_step(self, batch, step):
            self.steps_run += 1
            return super().train_step(batch, step)

        def extra_state(self):
            return {"steps_run": self.steps_run}

        def load_extra_state(self, state):
            self.steps_run = state.get("steps_run", 0)  # {} from a checkpoint of another backend

        def checkpoint_state(self):
            optimizer = {}
            for name, param in self.model.named_parameters():
                state = self.optimizer.state[param]
                if not state:  # before the first step: the templates a load fills
                    state.update({"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                  "exp_avg_sq": torch.zeros_like(param)})
                optimizer[name] = state
            return {"model": {n: p.detach() for n, p in self.model.named_parameters()}, "optimizer": optimizer}

        def load_checkpoint_state(self, state):
            """The templates were this backend's own tensors, already filled in place."""

    return DcpSingleProcessBackend


@pytest.mark.core
def test_sharded_checkpoint_resumes_in_one_process_and_exports(straight, tmp_path):
    """A checkpoint written through torch.distributed.checkpoint (as a multi-process layout writes
    it) resumes exactly under the plain single-process backend, and `ipu-t5 export` reads it."""
    from ipu_t5.cli import main
    from ipu_t5.layout import plan_from_config

    out = tmp_path / "run"
    config = config_for(out, **{"training.max_steps": 5})
    first = T5Trainer(config, backend=dcp_backend_class()(config, plan_from_config(config)))
    first.train()
    saved = checkpointing.inspect(checkpointing.step_path(out, 5))
    assert saved.sharded and (saved.path / checkpointing.SHARDED_DIR / ".metadata").is_file()
    assert not (saved.path / checkpointing.MODEL_FILE).exists()
    assert_same_tensors(weights(saved.path), weights(checkpointing.step_path(straight, 5)))
    train(out, **{"output.resume_from_checkpoint": "auto"})
    assert losses(out) == losses(straight)
    assert_same_tensors(weights(checkpointing.step_path(out, 10)), weights(checkpointing.step_path(straight, 10)))

    # ... and the other way: a sharded backend resuming a safetensors checkpoint and a sharded one.
    for source in (checkpointing.step_path(straight, 5), saved.path):
        again = tmp_path / "again-{}".format(source.parent.parent.name)
        config = config_for(again, **{"output.resume_from_checkpoint": str(source)})
        trainer = T5Trainer(config, backend=dcp_backend_class()(config, plan_from_config(config)))
        assert trainer.backend.steps_run == (5 if source == saved.path else 0)
        trainer.train()
        assert losses(again) == {s: v for s, v in losses(straight).items() if s > 5}
        assert_same_tensors(weights(checkpointing.step_path(again, 10)), weights(checkpointing.step_path(straight, 10)))

    assert main(["export", str(saved.path), "--out", str(tmp_path / "hf")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "hf" / "model.safetensors")), weights(checkpointing.step_path(straight, 5)))


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("2x2", "1x1"), ("1x1", "2x2")])
def test_checkpoint_resumes_under_another_layout(tmp_path, first, then):
    """Checkpoints are stored by parameter name: a run checkpointed at step 5 under one layout
    (2 stages x 2 replicas, or one process) continues under the other with the losses and final
    weights of the uninterrupted run."""
    # At 1e-3 Adam magnifies float rounding between splits past 1e-5 within a few steps 
    # tests/backends/torch_distributed/test_pipeline.py); the layouts themselves agree far closer than that.
    values = {"training.max_steps": 10, "training.learning_rate": "1e-4"}

    def layout(spec):
        stages, replicas = spec.split("x")
        return ["--stages", stages, "--replicas", replicas]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_cli(cli_args(straight, *layout(first), **values), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(cli_args(resumed, *layout(then), "--resume", str(checkpointing.step_path(straight, 5)), **values),
                   env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, found = losses(straight), losses(resumed)
    assert sorted(found) == list(range(6, 11))
    for step, loss in found.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    assert_same_tensors(weights(checkpointing.step_path(straight, 10)), weights(checkpointing.step_path(resumed, 10)),
                        exact=False)
