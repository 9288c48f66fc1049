"""How long the step that writes a checkpoint takes against an ordinary step, with checkpoints
written in place (`output.async_save=false`) and beside training (`true`).

    python bench/checkpoint_stall.py [--stages 4] [--repeats 1] [--save-every 3] [--checkpoints 2]

A flan-t5-base-shaped model with random weights (bench/memory.py's `save_model`) trains under
`--stages N` on CPU processes (torch backend, global batch 8, demo MNLI data), one run with each
setting, alternating (off, on, off, on, ...) so both see the same machine. Rank 0 appends a record
to metrics.jsonl right after each step; the bench notes when each record appears (polled every
5 ms), so the gap from step k to step k+1 is step k+1's time, plus, when step k wrote a checkpoint,
what writing it cost the loop. A run is killed once it has written `--checkpoints` checkpoints and
taken one more step (no final checkpoint, export or reload). Prints every gap, the median ordinary
step and each checkpoint step's ratio to it; numbers are printed, never asserted.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLL_SECONDS = 0.005


def record_times(metrics: Path, proc: subprocess.Popen, last_step: int) -> Dict[int, float]:
    """When each training step's record appeared in `metrics`, until `last_step`'s."""
    seen: Dict[int, float] = {}
    offset = 0
    pending = b""
    while last_step not in seen:
        if proc.poll() is not None:
            raise SystemExit("the run ended (exit {}) before step {}".format(proc.returncode, last_step))
        if metrics.is_file():
            with open(str(metrics), "rb") as f:
                f.seek(offset)
                data = f.read()
            now = time.perf_counter()
            offset += len(data)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                record = json.loads(line)
                if "lr" in record:
                    seen[record["step"]] = now
        time.sleep(POLL_SECONDS)
    return seen


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run(model_dir: Path, workdir: Path, name: str, stages: int, save_every: int, checkpoints: int,
        async_save: bool) -> List[float]:
    """The gaps between consecutive step records of one run (gap i: from step i+1 to step i+2)."""
    from bench.memory import run_overrides

    out = workdir / name
    last = save_every * checkpoints + 1
    command = [sys.executable, "-m", "ipu_t5", "train", "--model", "base", "--pretrained", str(model_dir),
               "--task", "mnli", "--max-steps", str(last + 50), "--output-dir", str(out), "--overwrite",
               "--stages", str(stages), "--save-every", str(save_every)]
    for value in run_overrides(stages, 1, 8, ["validation.do_eval=false", "output.save_total_limit=1",
                                              "output.async_save={}".format(str(async_save).lower())]):
        if not value.startswith("output.save_steps="):
            command += ["--set", value]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    with open(str(workdir / (name + ".log")), "w") as log:
        proc = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            seen = record_times(out / "metrics.jsonl", proc, last)
        finally:
            kill_tree(proc)
    return [seen[s + 1] - seen[s] for s in range(1, last)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting, alternating")
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints written per run")
    args = parser.parse_args()
    from bench.memory import save_model

    started = time.time()
    load = os.getloadavg()[0]
    found: Dict[bool, List[List[float]]] = {False: [], True: []}
    # The model and each run's checkpoints take about 6.5 GB: gone when the bench ends, however it ends.
    with tempfile.TemporaryDirectory(prefix="ipu-t5-ckpt-bench-") as name:
        workdir = Path(name)
        model_dir = workdir / "model"
        save_model(model_dir, "base")
        for repeat in range(args.repeats):
            for async_save in (False, True):
                gaps = run(model_dir, workdir, "{}-{}".format("async" if async_save else "sync", repeat), args.stages,
                           args.save_every, args.checkpoints, async_save)
                found[async_save].append(gaps)
                print("async_save={} run {}: gaps {}".format(async_save, repeat,
                                                             " ".join("{:.2f}".format(g) for g in gaps)), flush=True)
    print("\nbase-shaped model, --stages {}, a checkpoint every {} steps; load average {:.1f} at the start, {:.1f} "
          "at the end; {:.0f} s".format(args.stages, args.save_every, load, os.getloadavg()[0], time.time() - started))
    print("| output.async_save | ordinary step (s), median [min, max] | checkpoint steps (s) | checkpoint / ordinary |")
    print("|---|---|---|---|")
    for async_save, runs in found.items():
        # Gap i ends at step i+2; it holds a checkpoint's cost when step i+1 wrote one.
        ordinary = [g for gaps in runs for i, g in enumerate(gaps) if (i + 1) % args.save_every]
        writing = [g for gaps in runs for i, g in enumerate(gaps) if not (i + 1) % args.save_every]
        median = statistics.median(ordinary)
        print("| {} | {:.2f} [{:.2f}, {:.2f}] | {} | {} |".format(
            str(async_save).lower(), median, min(ordinary), max(ordinary), ", ".join("{:.2f}".format(g) for g in writing),
            ", ".join("{:.2f}x".format(g / median) for g in writing)))


if __name__ == "__main__":
    main()
