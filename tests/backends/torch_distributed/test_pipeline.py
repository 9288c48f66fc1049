"""The torch.distributed backend against one process: per-step losses, weights, validation and
checkpoints under 2 stages x 2 replicas, 1 x 2 and 2 x 1, each under GPipe and 1F1B (plus FSDP2
and Interleaved1F1B), on CPU with gloo; the launcher's failure handling; the stage modules.

Each layout is one torchrun launch of tests/backends/torch_distributed/pipeline_worker.py; the one-process reference is
computed here with the single-process backend on the same config and data.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ipu_t5.models import TIED_ALIASES
from tests.conftest import ROOT, losses, run_cli, sdk_python, subprocess_env
from tests.backends.torch_distributed.pipeline_worker import RESUMED_STEPS, STEPS, make_config, result


LAYOUTS = {
    # (stages, replicas): worker runs (SCHEDULE[:DATA_PARALLEL])
    (2, 2): ["1F1B", "GPipe", "1F1B:fsdp", "1F1B:fsdp-stage"],
    (1, 2): ["1F1B", "GPipe"],
    (2, 1): ["1F1B", "GPipe", "Interleaved1F1B"],
}


def _one_process(out, lora=False, extra=()):
    """One process: the starting weights, 5 steps, validation, a checkpoint at step 5, then on to
    step 8 (`extra`: more overrides)."""
    from ipu_t5.training.trainer import T5Trainer

    trainer = T5Trainer(make_config(out, backend="single", lora=lora, extra=extra))
    start = {k: v.clone() for k, v in trainer.backend.model_state_dict().items()}
    trainer.train()
    at_five = result(trainer, trainer.evaluate())
    trainer.save_checkpoint(out / "checkpoint")
    trainer.config.training.max_steps = RESUMED_STEPS
    trainer.train()
    at_eight = result(trainer)
    trainer.close()
    return {"start": start, "five": at_five, "eight": at_eight, "checkpoint": out / "checkpoint", "root": out.parent}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("single") / "run")


def _run_worker(out, stages, replicas, runs, *options):
    """tests/backends/torch_distributed/pipeline_worker.py under torchrun: its results by run name (and "resumed", with
    --resume-from), plus the first run's checkpoint path."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(stages * replicas), "-m", "tests.backends.torch_distributed.pipeline_worker",
               str(out), str(stages), str(replicas)] + list(runs) + list(options)
    done = subprocess.run(command, cwd=str(ROOT), env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    found = {run: torch.load(str(out / run.replace(":", "-") / "result.pt")) for run in runs}
    if "--resume-from" in options:
        found["resumed"] = torch.load(str(out / "resumed" / "result.pt"))
    if runs:
        found["checkpoint"] = out / runs[0] / "checkpoint"
    found["out"] = out
    return found


@pytest.fixture(scope="module")
def launched(reference, tmp_path_factory):
    """Launch the worker once per layout (on first use); returns its results by run name."""
    cache = {}

    def launch(layout):
        if layout not in cache:
            stages, replicas = layout
            out = tmp_path_factory.mktemp("layout{}x{}".format(stages, replicas))
            # Loading into FSDP2 shards is the harder path: take it.
            resume_from = ["--resume-from", str(reference["checkpoint"]), "--resume-run", "1F1B:fsdp"]
            cache[layout] = _run_worker(out, stages, replicas, LAYOUTS[layout], *(resume_from if layout == (2, 2) else []))
        return cache[layout]

    return launch


@pytest.fixture(params=sorted(LAYOUTS), ids=lambda layout: "{}x{}".format(*layout))
def layout_run(request, launched):
    return request.param, launched(request.param)


def _assert_losses_equal(found, expected):
    assert len(found) == len(expected)
    for step, (a, b) in enumerate(zip(found, expected), 1):
        assert abs(a - b) <= 1e-5 * abs(b), "step {}: {} under the layout, {} in one process".format(step, a, b)


def _assert_weights_equal(found, expected):
    names = [n for n in expected if n not in TIED_ALIASES]
    assert sorted(n for n in found if n not in TIED_ALIASES) == sorted(names)
    worst = max(names, key=lambda n: (found[n] - expected[n]).abs().max().item())
    assert torch.allclose(found[worst], expected[worst], rtol=0, atol=1e-5), \
        "{} differs by {}".format(worst, (found[worst] - expected[worst]).abs().max().item())


@pytest.mark.slow
def test_losses_match_one_process(layout_run, reference):
    _, found = layout_run
    for run in LAYOUTS[layout_run[0]]:
        assert len(found[run]["losses"]) == STEPS
        _assert_losses_equal(found[run]["losses"], reference["five"]["losses"][:STEPS])


@pytest.mark.slow
def test_weights_match_one_process(layout_run, reference):
    _, found = layout_run
    for run in LAYOUTS[layout_run[0]]:
        _assert_weights_equal(found[run]["weights"], reference["five"]["weights"])


@pytest.mark.slow
def test_validation_matches_one_process(layout_run, reference):
    _, found = layout_run
    for run in LAYOUTS[layout_run[0]]:
        assert found[run]["predictions"] == reference["five"]["predictions"]
        assert found[run]["accuracy"] == reference["five"]["accuracy"]


@pytest.mark.slow
def test_fsdp2_under_2x2_makes_each_block_a_unit_unless_the_stage_is_kept_whole(launched):
    found = launched((2, 2))
    # Rank 0 holds stage 0 of the tiny model: the embedding and encoder blocks.
    units = found["1F1B:fsdp"]["fsdp_units"]
    blocks = [u for u in units if u.startswith("encoder.block.")]
    assert "" not in units and "shared" in units and len(blocks) >= 2
    assert sorted(units) == sorted(blocks + ["shared"] + [u for u in units if u.endswith("final_layer_norm")])
    assert found["1F1B:fsdp-stage"]["fsdp_units"] == [""]
    assert found["1F1B"]["fsdp_units"] == []


@pytest.mark.slow
def test_one_process_checkpoint_continues_under_2x2(launched, reference):
    found = launched((2, 2))
    _assert_losses_equal(found["resumed"]["losses"], reference["eight"]["losses"][STEPS:])
    _assert_weights_equal(found["resumed"]["weights"], reference["eight"]["weights"])


def _assert_continues_in_one_process(checkpoint, reference, output_dir, lora=False):
    """`--resume checkpoint` in one process continues to step 8 as the uninterrupted `reference`."""
    from ipu_t5.training.trainer import T5Trainer

    trainer = T5Trainer(make_config(output_dir, backend="single", lora=lora, max_steps=RESUMED_STEPS,
                                    extra=["output.resume_from_checkpoint={}".format(checkpoint)]))
    trainer.train()
    continued = result(trainer)
    trainer.close()
    _assert_losses_equal(continued["losses"], reference["eight"]["losses"][STEPS:])
    _assert_weights_equal(continued["weights"], reference["eight"]["weights"])


@pytest.mark.slow
def test_2x2_checkpoint_continues_in_one_process(launched, reference, tmp_path):
    _assert_continues_in_one_process(launched((2, 2))["checkpoint"], reference, tmp_path / "run")


@pytest.mark.slow
def test_2x2_checkpoint_continues_under_4x1(launched, reference, tmp_path):
    found = _run_worker(tmp_path / "layout4x1", 4, 1, [], "--resume-from", str(launched((2, 2))["checkpoint"]))
    _assert_losses_equal(found["resumed"]["losses"], reference["eight"]["losses"][STEPS:])
    _assert_weights_equal(found["resumed"]["weights"], reference["eight"]["weights"])


@pytest.mark.slow
def test_2x2_checkpoint_is_sharded_and_exports_in_one_process_as_the_split_exported_it(launched, tmp_path):
    """Every rank wrote its share through torch.distributed.checkpoint; `ipu-t5 export` reads it in
    one process, tensor by tensor, into the same tensors, bit for bit, as the 2x2 run's own export
    (each stage its own shard), and both predict the same."""
    from ipu_t5 import checkpointing
    from ipu_t5.checkpointing.export import reload_and_predict, same_bits
    from ipu_t5.checkpointing.views import SafetensorsView, weight_files

    found = launched((2, 2))
    checkpoint = found["checkpoint"]
    assert checkpointing.inspect(checkpoint).sharded and not (checkpoint / checkpointing.MODEL_FILE).exists()
    writers = {p.name.split("_")[2] for p in (checkpoint / checkpointing.SHARDED_DIR).glob("__*.distcp")}
    assert len(writers) >= 2, writers
    split_export = found["out"] / "1F1B" / "hf"
    assert len(weight_files(split_export)) == 2
    done = run_cli(["export", str(checkpoint), "--out", str(tmp_path / "hf")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded with transformers" in done.stdout
    assert weight_files(tmp_path / "hf") == [tmp_path / "hf" / "model.safetensors"]
    split, alone = SafetensorsView(weight_files(split_export)), SafetensorsView(weight_files(tmp_path / "hf"))
    assert sorted(split) == sorted(alone)
    assert all(same_bits(split[name], alone[name]) for name in split)
    rows = [json.loads(line) for line in (found["out"] / "1F1B" / "eval_predictions.jsonl").read_text().splitlines()]
    prompts, generated = [r["prompt"] for r in rows], [r["generated"] for r in rows]
    assert reload_and_predict(split_export, prompts) == reload_and_predict(tmp_path / "hf", prompts) == generated
    if sdk_python():
        # The Poplar SDK's torch 2.0 reads what this torch's torch.distributed.checkpoint wrote.
        done = subprocess.run([sdk_python(), "-m", "ipu_t5", "export", str(checkpoint), "--out", str(tmp_path / "sdk")],
                              cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        sdk = SafetensorsView(weight_files(tmp_path / "sdk"))
        assert sorted(sdk) == sorted(split) and all(same_bits(split[name], sdk[name]) for name in split)


# ----- LoRA under the split: the adapters train, the base stays as it was -----

LORA_RUNS = ["1F1B", "GPipe", "1F1B:fsdp", "Interleaved1F1B"]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """As `reference`, with LoRA: the checkpoint holds the adapters."""
    return _one_process(tmp_path_factory.mktemp("lora-single") / "run", lora=True)


@pytest.fixture(scope="module")
def lora_launched(lora_reference, tmp_path_factory):
    """2 stages x 2 replicas with LoRA: 1F1B, GPipe and Interleaved1F1B under DDP, 1F1B under FSDP2,
    each exported; then the one-process adapter checkpoint resumed under FSDP2."""
    return _run_worker(tmp_path_factory.mktemp("lora2x2"), 2, 2, LORA_RUNS, "--lora", "--resume-from",
                       str(lora_reference["checkpoint"]), "--resume-run", "1F1B:fsdp")


def _adapters(names):
    from ipu_t5 import lora

    return sorted(n for n in names if lora.is_adapter_key(n))


@pytest.mark.slow
def test_lora_under_2x2_matches_one_process_and_trains_only_the_adapters(lora_launched, lora_reference):
    start = lora_reference["start"]
    adapters = _adapters(start)
    assert len(adapters) == 2 * 12  # A and B of q and v in 2 encoder, 2 decoder self- and 2 cross-attentions
    for run in LORA_RUNS:
        found = lora_launched[run]
        _assert_losses_equal(found["losses"], lora_reference["five"]["losses"][:STEPS])
        _assert_weights_equal(found["weights"], lora_reference["five"]["weights"])
        assert found["optimized"] == adapters, run
        for name, value in found["weights"].items():
            if name not in adapters:
                assert torch.equal(value, start[name]), "{}: frozen weight {} changed".format(run, name)
        assert all(not torch.equal(found["weights"][n], start[n]) for n in adapters if ".lora_B." in n), run


@pytest.mark.slow
def test_lora_merged_export_under_2x2_predicts_what_validation_predicted(lora_launched, lora_reference):
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.checkpointing.views import SafetensorsView, weight_files

    for run in LORA_RUNS:
        assert lora_launched[run]["predictions"] == lora_reference["five"]["predictions"], run
        run_dir = lora_launched["out"] / run.replace(":", "-")
        # Each stage wrote its own shard of the merged weights.
        names = list(SafetensorsView(weight_files(run_dir / "hf")))
        assert not [n for n in names if ".lora_" in n or ".base_layer." in n]
        rows = [json.loads(line) for line in open(run_dir / "eval_predictions.jsonl")]
        assert len(rows) == 21
        assert reload_and_predict(run_dir / "hf", [r["prompt"] for r in rows]) == [r["generated"] for r in rows], run
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_2x2_checkpoint_holds_only_adapters_and_resumes_in_one_process(lora_launched, lora_reference, tmp_path):
    from ipu_t5 import checkpointing

    saved = checkpointing.inspect(lora_launched["checkpoint"])
    adapters = _adapters(lora_reference["start"])
    assert sorted(saved.model_tensors()) == adapters
    assert sorted(saved.optimizer_state()) == adapters
    _assert_continues_in_one_process(lora_launched["checkpoint"], lora_reference, tmp_path / "run", lora=True)


@pytest.mark.slow
def test_lora_one_process_checkpoint_continues_under_2x2(lora_launched, lora_reference):
    found = lora_launched["resumed"]
    _assert_losses_equal(found["losses"], lora_reference["eight"]["losses"][STEPS:])
    _assert_weights_equal(found["weights"], lora_reference["eight"]["weights"])


@pytest.mark.slow
def test_cli_lora_under_2x2_finishes(tmp_path):
    """The command that hung (ranks waiting in different collectives), adapting only the LM head so
    that stage 0 has nothing to train at all. A short collective timeout keeps a regression from
    hanging the suite: it would end the run with that rank's message."""
    out = tmp_path / "run"
    done = run_cli(["train", "--model", "tiny", "--peft", "lora", "--stages", "2", "--replicas", "2", "--max-steps", "4",
                    "--output-dir", str(out), "--set", "output.report_to_tensorboard=false", "--set", "peft.r=4",
                    "--set", "peft.target_modules=lm_head", "--set", "layout.ddp_timeout=120",
                    "--set", "data.demo_train_samples=200", "--set", "data.demo_eval_samples=16",
                    "--set", "training.global_batch_size=8",
                    # The cut of the regression (the default cut by memory now gives [2, 2]).
                    "--set", "layout.layers_per_stage=[1,3]"], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "stage 0: embedding, encoder.0\n" in done.stdout + done.stderr
    assert "reloaded with plain transformers: 16/16 predictions identical" in done.stdout
    assert "(LoRA adapters)" in done.stdout
    assert len(losses(out)) == 4


@pytest.mark.slow
def test_cli_launches_2x2_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    done = run_cli(["train", "--model", "tiny", "--stages", "2", "--replicas", "2", "--max-steps", "6",
                    "--output-dir", str(out), "--set", "output.report_to_tensorboard=false",
                    "--set", "data.demo_train_samples=200", "--set", "data.demo_eval_samples=24",
                    "--set", "training.global_batch_size=8"], env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    # Validation under the split predicted exactly what the export predicts in plain transformers.
    assert "reloaded with plain transformers: 24/24 predictions identical" in done.stdout
    assert "2 stage(s) x 2 replica(s) on 4 CPU process(es)" in done.stderr + done.stdout
    assert len(losses(out)) == 6
    # Each stage wrote its own shard of the export; the main process the index.
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]


@pytest.mark.slow
def test_validation_of_a_trained_model_under_2x2_equals_one_process(trained, tmp_path):
    """The session's trained model (one process scored it) validated again by 4 processes."""
    out = tmp_path / "run"
    done = run_cli(["evaluate", "--model", "tiny", "--stages", "2", "--replicas", "2", "--pretrained",
                    str(trained["hf_dir"]), "--output-dir", str(out), "--set", "output.report_to_tensorboard=false",
                    "--set", "data.demo_train_samples=3000", "--set", "data.demo_eval_samples=150",
                    "--set", "training.global_batch_size=32"], env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_samples"] == trained["results"]["num_samples"] == 150
    assert results["accuracy"] == trained["results"]["accuracy"] > 0.5

    def generated(directory):
        return [json.loads(line)["generated"] for line in open(directory / "eval_predictions.jsonl")]

    assert generated(out) == generated(trained["output_dir"])


def _launch(mode):
    code = ("import argparse, sys; from ipu_t5.backends.torch_distributed.launch import add_cluster_flags, launch; "
            "p = argparse.ArgumentParser(); add_cluster_flags(p); "
            "sys.exit(launch(3, [{!r}], p.parse_args([]), module='tests.backends.torch_distributed.failing_worker'))".format(mode))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    return done, time.monotonic() - started


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_message():
    done, _ = _launch("fail")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "ipu-t5: error: the input file is missing (rank 1)"


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_by_timeout():
    from tests.backends.torch_distributed.failing_worker import TIMEOUT_SECONDS

    done, seconds = _launch("hang")
    assert done.returncode == 1
    assert "Timed out" in done.stderr.strip().splitlines()[-1]
    # The others give up after the collective timeout; torchrun then stops the sleeping rank.
    assert seconds < 60 + TIMEOUT_SECONDS


@pytest.mark.slow
def test_wrong_process_count_is_refused():
    done, _ = _launch("count")
    assert done.returncode == 2
    # Every rank refuses; which one torchrun sees first (and whether the others were stopped
    # before they refused too) varies, hence the optional rank.
    assert re.fullmatch(re.escape(
        "ipu-t5: error: the layout needs stages x replicas = 2 x 2 = 4 processes but 3 were launched: launch 4 "
        "(run.sh does this) or change --stages/--replicas.") + r"( \(rank \d\))?", done.stderr.strip().splitlines()[-1])


def _wait_for_a_checkpoint(proc, out):
    """The newest checkpoint step once one exists (written atomically: there means complete)."""
    while True:
        steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")) \
            if (out / "checkpoints").is_dir() else []
        if steps:
            return steps[-1]
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)


def _rank_process(launcher, rank):
    """The worker process whose RANK is `rank`, among the launcher's descendants."""
    import psutil

    found = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                found.append(child)
        except psutil.Error:  # a helper process that has already gone
            continue
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_a_killed_rank_is_named_with_its_signal_and_the_run_resumes(tmp_path):
    """kill -9 of rank 2 of a 2 x 2 run: one line names rank 2 and SIGKILL (not a rank that saw
    its connection close), no traceback reaches the terminal, every rank's output is in its log,
    and the printed command continues from the last checkpoint."""
    import shlex
    import signal

    from ipu_t5.backends.torch_distributed.rank_logs import TRACEBACK_MARK

    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--stages", "2", "--replicas", "2", "--max-steps", "400", "--save-every", "5",
            "--output-dir", str(out), "--set", "output.report_to_tensorboard=false",
            "--set", "data.demo_train_samples=200", "--set", "data.demo_eval_samples=16",
            "--set", "training.global_batch_size=8"]
    # Files, not pipes: the launcher shows rank 0's progress as it comes, and nothing reads a pipe
    # until the end.
    with open(str(tmp_path / "stdout"), "w") as stdout_file, open(str(tmp_path / "stderr"), "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "ipu_t5"] + args, cwd=str(ROOT), stdout=stdout_file,
                                stderr=stderr_file, env=subprocess_env(OMP_NUM_THREADS="1"))
        try:
            _wait_for_a_checkpoint(proc, out)
            _rank_process(proc, 2).send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    last = stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"ipu-t5: error: rank 2 was killed by signal SIGKILL\. Each rank's full output is in (\S+)"
                         r"/<local rank>/stdout\.log and stderr\.log\. Resume with: (ipu-t5 train .*)", last)
    assert found, last
    logs = Path(found.group(1))
    assert str(logs).startswith(str(out / "logs")) and sorted(p.name for p in logs.iterdir()) == ["0", "1", "2", "3"]
    # The ranks that lost their peer kept their tracebacks, in their logs only.
    assert any(TRACEBACK_MARK in (logs / r / "stderr.log").read_text() for r in "013")
    assert "stage 0: embedding, encoder.0" in (logs / "0" / "stdout.log").read_text()
    resume = shlex.split(found.group(2))
    assert resume[0] == "ipu-t5" and resume[-2:] == ["--resume", "auto"] and resume[1:-2] == args
    checkpoint = _wait_for_a_checkpoint(proc, out)
    done = run_cli(resume[1:] + ["--max-steps", str(checkpoint + 2)], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming from {} at step {}".format(out / "checkpoints" / "step-{}".format(checkpoint), checkpoint) \
        in done.stdout
    assert sorted(losses(out)) == list(range(1, checkpoint + 3))


def test_torch_backend_runs_a_1x1_layout_in_this_process(tmp_path):
    """No torchrun: the backend makes a one-process group and matches the single-process backend."""
    from ipu_t5.training.trainer import T5Trainer

    found = {}
    for backend in ("torch", "single"):
        trainer = T5Trainer(make_config(tmp_path / backend, backend=backend, max_steps=2))
        trainer.train()
        found[backend] = result(trainer)
        trainer.close()
    assert not torch.distributed.is_initialized()
    _assert_losses_equal(found["torch"]["losses"], found["single"]["losses"])
    _assert_weights_equal(found["torch"]["weights"], found["single"]["weights"])


@pytest.mark.core
def test_layout_errors_stop_the_cli_before_any_process_starts(tmp_path):
    done = run_cli(["train", "--model", "tiny", "--stages", "3", "--replicas", "2",
                    "--set", "layout.layers_per_stage=[2,1]", "--output-dir", str(tmp_path / "run")])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ipu-t5: error: layers_per_stage [2, 1] has 2 entries but there are 3 stages: give one count per stage."]


@pytest.mark.core
def test_cluster_flags_become_torchrun_arguments():
    from ipu_t5.errors import UserError
    from ipu_t5.backends.torch_distributed.launch import add_cluster_flags, torchrun_args

    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    assert torchrun_args(4, parser.parse_args([])) == ["--nnodes", "1", "--nproc-per-node", "4", "--max-restarts", "0",
                                                       "--standalone"]
    assert torchrun_args(64, parser.parse_args(["--nnodes", "8", "--rdzv-endpoint", "head:29400"])) == [
        "--nnodes", "8", "--nproc-per-node", "8", "--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        "head:29400", "--rdzv-id", "ipu-t5"]
    assert torchrun_args(16, parser.parse_args(["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"])) == [
        "--nnodes", "2", "--nproc-per-node", "8", "--max-restarts", "0", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    with pytest.raises(UserError, match="do not split evenly over --nnodes 3"):
        torchrun_args(4, parser.parse_args(["--nnodes", "3"]))
    with pytest.raises(UserError, match="needs --rdzv-endpoint"):
        torchrun_args(4, parser.parse_args(["--nnodes", "2"]))
    with pytest.raises(UserError, match="= 6 processes, but the layout needs stages x replicas = 4"):
        torchrun_args(4, parser.parse_args(["--nnodes", "2", "--nproc-per-node", "3", "--rdzv-endpoint", "h:1"]))


@pytest.mark.parametrize("counts", [[4], [1, 3], [2, 2], [3, 1], [1, 1, 1, 1]])
def test_stage_chunks_compose_to_the_hf_model(counts):
    """Chunks cut anywhere (inside the encoder, between encoder and decoder, inside the decoder)
    give HF's logits and HF's greedy generation, carrying the position biases and encoder output."""
    from ipu_t5.backends.torch_distributed.stages import build_chunks
    from ipu_t5.config import load_config
    from ipu_t5.layout import plan_layout
    from ipu_t5.model_source import build_model, canonical_size

    model = build_model(load_config("tiny"), 512).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 512, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[2, 4:] = 0
    ids[mask == 0] = 0
    decoder_ids = torch.randint(2, 512, (3, 5), generator=generator)
    decoder_ids[:, 0] = 0
    expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    plan = plan_layout(canonical_size("tiny"), 16, len(counts), 1, layers_per_stage=counts)
    chunks = [c.eval() for c in build_chunks(model, plan.stage_blocks)]
    carried = (ids, mask, decoder_ids)
    for chunk in chunks:
        carried = chunk(*carried)
    torch.testing.assert_close(carried, expected, rtol=1e-5, atol=1e-5)

    steps = 6
    wanted = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                            do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    state, caches = {"input_ids": ids}, {}
    for index, chunk in enumerate(chunks):
        state = chunk.encode(dict(state, attention_mask=mask))
        if chunk.decoder_ids:
            caches[index] = chunk.start_decoding(state["encoder_output"], mask)
    tokens, produced = torch.zeros(3, 1, dtype=torch.long), []
    for position in range(steps):
        # The first chunk holds the embedding: it embeds the tokens for the chunk with decoder.0.
        hidden, bias = chunks[0].embed_tokens(tokens), None
        for index, chunk in enumerate(chunks):
            if not chunk.decoder_ids:
                continue
            out = chunk.decode_step(position, hidden, bias, caches[index])
            if chunk.has_head:
                out[:, 1] = float("-inf")  # as min_new_tokens does: no end-of-sequence yet
                tokens = out.argmax(-1, keepdim=True)
            else:
                hidden, bias = out
        produced.append(tokens)
    assert torch.equal(torch.cat(produced, 1), wanted[:, 1:])


def test_stage_chunks_of_a_lora_model_keep_its_adapters_and_its_frozen_weights():
    """Only the adapters train; the frozen shared embedding stays frozen on the one chunk holding it,
    and the embedded decoder inputs it sends on give the model's logits."""
    from ipu_t5 import lora
    from ipu_t5.backends.torch_distributed.stages import build_chunks
    from ipu_t5.config import load_config
    from ipu_t5.layout import plan_layout
    from ipu_t5.model_source import build_model, canonical_size

    config = load_config("tiny", overrides=["peft.method=lora", "peft.r=4"])
    model = lora.apply_lora(build_model(config, 512), config.peft).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: make the adapters change the logits
                param.normal_(0, 0.1)
    plan = plan_layout(canonical_size("tiny"), 16, 2, 1, layers_per_stage=[2, 2])
    chunks = [c.eval() for c in build_chunks(model, plan.stage_blocks)]
    assert not chunks[0].shared.weight.requires_grad and not hasattr(chunks[1], "shared")
    trainable = [n for chunk in chunks for n, p in chunk.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(lora.is_adapter_key(n) for n in trainable)
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    carried = (ids, torch.ones_like(ids), torch.tensor([[0, 5, 7], [0, 3, 3]]))
    for chunk in chunks:
        carried = chunk(*carried)
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 7], [0, 3, 3]])).logits
    torch.testing.assert_close(carried, expected, rtol=1e-5, atol=1e-5)


def test_stage_chunks_name_parameters_as_hf():
    from ipu_t5.backends.torch_distributed.stages import CARRIED, build_chunks
    from ipu_t5.config import load_config
    from ipu_t5.layout import plan_layout
    from ipu_t5.model_source import build_model, canonical_size

    model = build_model(load_config("tiny"), 512)
    plan = plan_layout(canonical_size("tiny"), 16, 2, 1, layers_per_stage=[2, 2])
    chunks = build_chunks(model, plan.stage_blocks)
    names = [n for chunk in chunks for n, _ in chunk.named_parameters()]
    # Every parameter once: the shared embedding only in the first chunk, which embeds the decoder's
    # inputs for the chunk with decoder.0 (no copy there).
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert chunks[0].shared.weight is model.shared.weight and not hasattr(chunks[1], "shared")
    assert chunks[0].end == "encoded" and "decoder_embeds" in CARRIED[chunks[0].end]
