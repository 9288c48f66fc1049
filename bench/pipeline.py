"""Pipeline efficiency of the torch.distributed backend, and the balance of the planned stages.

    python bench/pipeline.py [--model small] [--micro-batches 2 4 8] [--steps 3] [--source-len 64]

1. Step time: the same global batch, one process against 2 stages (torchrun, gloo, one thread per
   process), under GPipe and 1F1B, for several micro-batch counts m. An ideal 2-stage pipeline
   takes single / 2 x balance / (1 - bubble), with bubble = (p-1)/(m+p-1) and balance the planned
   slowest / mean stage; the measured idle fraction is 1 - single / (2 x pipeline).
2. Balance: slowest stage / mean stage of the planned split (forward FLOPs per block) for XL on 8
   stages and XXL on 16, at MNLI lengths, beside the best any contiguous split could reach if a
   stage boundary could also fall between a block's attention and feed-forward sublayers.

Random weights (no download); numbers are printed, never asserted.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ipu_t5.layout import best_balance, plan_layout  # noqa: E402
from ipu_t5.models import canonical_size  # noqa: E402

GLOBAL_BATCH = 16
TARGET_LEN = 4


def _config(model, stages, micro_batches, schedule, backend):
    from ipu_t5.config import load_config

    return load_config(model, overrides=[
        "training.global_batch_size={}".format(GLOBAL_BATCH), "model.dropout_rate=0",
        "layout.stages={}".format(stages), "layout.gradient_accumulation_steps={}".format(micro_batches),
        "layout.pipeline_schedule={}".format(schedule), "layout.backend={}".format(backend)])


def _model(model):
    """A randomly initialised model of the size's architecture (no weights to fetch)."""
    from transformers import T5Config

    from ipu_t5.models import model_from_config

    torch.manual_seed(0)
    return model_from_config(T5Config(**canonical_size(model).t5_config_kwargs()))


def _batches(model, steps, source_len):
    from ipu_t5.data.batching import GlobalBatch

    vocab = canonical_size(model).vocab_size
    rng = random.Random(0)
    return [GlobalBatch([{"input_ids": [rng.randrange(3, vocab) for _ in range(source_len - 1)] + [1],
                          "labels": [rng.randrange(3, vocab) for _ in range(TARGET_LEN - 1)] + [1]}
                         for _ in range(GLOBAL_BATCH)]) for _ in range(steps + 1)]


def time_steps(model, stages, micro_batches, schedule, backend, steps, source_len) -> float:
    """Seconds per training step (after one warm-up step) under a layout, in this process."""
    from ipu_t5.backends import create_backend
    from ipu_t5.layout import plan_from_config

    config = _config(model, stages, micro_batches, schedule, backend)
    plan = plan_from_config(config, source_len, TARGET_LEN)
    runner = create_backend(config, plan)
    runner.setup(_model(model))
    batches = _batches(model, steps, source_len)
    runner.train_step(batches[0], 0)
    runner.barrier()
    started = time.perf_counter()
    for step, batch in enumerate(batches[1:], 1):
        runner.train_step(batch, step)
    seconds = (time.perf_counter() - started) / steps
    runner.close()
    return seconds


# A torchrun worker of this script finds its job here (torchrun would parse flags of its own).
WORKER_ENV = "IPU_T5_BENCH_WORKER"


def worker(job) -> None:
    """One rank of the 2-stage pipeline; rank 0 writes the timing."""
    torch.set_num_threads(1)
    seconds = time_steps(job["model"], 2, job["m"], job["schedule"], "torch", job["steps"], job["source_len"])
    if os.environ.get("RANK") == "0":
        Path(job["out"]).write_text(json.dumps({"seconds": seconds}))


def pipeline_seconds(args, micro_batches, schedule) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "time.json"
        job = {"model": args.model, "m": micro_batches, "schedule": schedule, "steps": args.steps,
               "source_len": args.source_len, "out": str(out)}
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        env[WORKER_ENV] = json.dumps(job)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__], check=True, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["seconds"]


def sublayer_costs(size, source_len, target_len):
    """Per-sublayer forward FLOPs in pipeline order, embedding and LM head folded in as in the plan."""
    costs = [c for block in size.block_names for c in size.sublayer_flops(block, source_len, target_len)]
    costs[-1] += size.block_flops("lm_head", source_len, target_len)
    return costs


def balance_table(source_lens) -> None:
    print("\nplanned balance (slowest stage / mean stage, forward FLOPs; target 1.05) of the compute-balanced "
          "cut (the IPU planner's) and of the torch backend's default cut, which evens out memory")
    print("{:<6} {:>6} {:>7} {:>16} {:>22} {:>24} {:>14} {:>24}".format(
        "model", "stages", "source", "compute cut", "best with sublayers", "params/stage min..max", "memory cut",
        "params/stage min..max"))
    for name, stages in (("xl", 8), ("xxl", 16)):
        size = canonical_size(name)
        for source_len in source_lens:
            row = []
            for split_by in ("compute", "memory"):
                plan = plan_layout(size, 256, stages, source_len=source_len, target_len=TARGET_LEN, split_by=split_by)
                params = [plan.stage_params(i) / 1e6 for i in range(stages)]
                row.append((plan.balance(source_len, TARGET_LEN), min(params), max(params)))
            print("{:<6} {:>6} {:>7} {:>16.3f} {:>22.3f} {:>17.0f}..{:.0f}M {:>14.3f} {:>17.0f}..{:.0f}M".format(
                name, stages, source_len, row[0][0],
                best_balance(sublayer_costs(size, source_len, TARGET_LEN), stages), row[0][1], row[0][2],
                row[1][0], row[1][1], row[1][2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="architecture to time (random weights)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--source-len", type=int, default=64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if WORKER_ENV in os.environ:
        worker(json.loads(os.environ[WORKER_ENV]))
        return
    args = parser.parse_args()
    torch.set_num_threads(1)
    balance = plan_layout(canonical_size(args.model), GLOBAL_BATCH, 2, source_len=args.source_len,
                          target_len=TARGET_LEN).balance(args.source_len, TARGET_LEN)
    print("step time, {} (random weights), global batch {}, source {} / target {} tokens, one thread per "
          "process; one process accumulates the same m micro-batches; planned 2-stage balance {:.3f}".format(
              args.model, GLOBAL_BATCH, args.source_len, TARGET_LEN, balance))
    print("{:<9} {:>3} {:>13} {:>15} {:>13} {:>20} {:>13}".format(
        "schedule", "m", "1 process s", "2 stages s", "ideal s", "bubble (p-1)/(m+p-1)", "measured idle"))
    for m in args.micro_batches:
        single = time_steps(args.model, 1, m, "1F1B", "single", args.steps, args.source_len)
        for schedule in ("GPipe", "1F1B"):
            seconds = pipeline_seconds(args, m, schedule)
            bubble = 1 / (m + 1)
            print("{:<9} {:>3} {:>13.3f} {:>15.3f} {:>13.3f} {:>20.3f} {:>13.3f}".format(
                schedule, m, single, seconds, single / 2 * balance / (1 - bubble), bubble, 1 - single / (2 * seconds)))
    balance_table([128, 256])


if __name__ == "__main__":
    main()
