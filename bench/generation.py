"""Validation samples/s in one process against the torch backend's pipeline, side by side.

    python bench/generation.py                    # flan-t5-small-shaped export, 600 prompts, 3 repeats
    python bench/generation.py --repeats 5 --stages 2 --micro-batches 4
    python bench/generation.py --schedule Interleaved1F1B     # the pipelined side's schedule
    python bench/generation.py --prepare-steps 4 --max-eval-samples 200 --one-process-threads 1   # as recorded

Builds (once) MNLI-shaped data (bench/mnli_shaped.py) and a flan-t5-small-shaped export fine-tuned
briefly so that it generates labels (bench/compare.py's `prepare`), then runs `ipu-t5 evaluate` on it
alternately in one process (the machine's threads) and under `--stages N` (N processes, one thread
each on a CPU, as torchrun starts them), each in a fresh process. Reports each run's samples/s, the
ratio per repeat (each pipelined run against the one-process run beside it), whether the
predictions of both and of transformers' greedy `generate` agree, and the memory plan's figure for
the caches in flight (`generation_plan.cache_bytes`). Timings on a shared machine move: the sides
alternate and every repeat is reported, not only a median.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _evaluate(spec, out: Path, stages: int, micro_batches, max_eval_samples=None, threads=None,
              schedule=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    overrides = dict(spec["ours_overrides"], **{"output.output_dir": str(out), "output.overwrite_output_dir": "true",
                                                "training.global_batch_size": spec["training"]["global_batch_size"]})
    if micro_batches:
        overrides["validation.generation_micro_batches"] = micro_batches
    if max_eval_samples:
        overrides["data.max_eval_samples"] = max_eval_samples
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "ipu_t5", "evaluate", "--model", spec["model"]]
    if stages > 1:
        command += ["--stages", str(stages)]
        env["OMP_NUM_THREADS"] = "1"
        if schedule:
            overrides["layout.pipeline_schedule"] = schedule
    for key, value in overrides.items():
        command += ["--set", "{}={}".format(key, value)]
    done = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("ipu-t5 evaluate failed:\n" + done.stderr[-4000:])
    results = json.loads((out / "eval_results.json").read_text())
    generated = [json.loads(line)["generated"] for line in open(out / "eval_predictions.jsonl")]
    prompts = [json.loads(line)["prompt"] for line in open(out / "eval_predictions.jsonl")]
    return {"samples_per_second": results["samples_per_second"], "accuracy": results["accuracy"],
            "generated": generated, "prompts": prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, help="validation.generation_micro_batches (default: the plan's)")
    parser.add_argument("--eval-samples", type=int, default=600)
    parser.add_argument("--max-eval-samples", type=int, help="validate only the first N prompts (shorter runs)")
    parser.add_argument("--one-process-threads", type=int,
                        help="OMP_NUM_THREADS of the one-process side (default: torch's, the machine's cores)")
    parser.add_argument("--schedule", help="layout.pipeline_schedule of the pipelined side (default: the config's)")
    parser.add_argument("--prepare-steps", type=int, default=40)
    parser.add_argument("--workdir", help="keep the data and export here (reused when present)")
    args = parser.parse_args()

    from bench.compare import prepare
    from ipu_t5.backends.torch_distributed.generation_plan import cache_bytes, slots
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.config import load_config
    from ipu_t5.layout import plan_from_config

    from bench.workdir import work_directory

    workdir = work_directory(args.workdir, "ipu-t5-generation-")
    spec_file = workdir / "spec.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
    else:
        settings = {"global_batch_size": 32, "steps": 1, "eval_samples": args.eval_samples, "eval_batch_size": 64,
                    "learning_rate": 3e-4, "prepare_steps": args.prepare_steps, "bf16": False, "peer_workers": 0}
        spec = prepare("small", settings, workdir, {})
        spec_file.write_text(json.dumps(spec))
    runs = []
    for repeat in range(args.repeats):
        # Alternate which side goes first, so a machine that slows down favours neither.
        order = [1, args.stages] if repeat % 2 == 0 else [args.stages, 1]
        found = {}
        for stages in order:
            found[stages] = _evaluate(spec, workdir / "eval-{}-{}".format(stages, repeat), stages, args.micro_batches,
                                      args.max_eval_samples, args.one_process_threads if stages == 1 else None,
                                      args.schedule)
            # The machine is shared: each run's 1-minute load average beside its figure.
            found[stages]["load"] = os.getloadavg()[0]
            print("repeat {} stages {}: {:.1f} samples/s (load {:.1f})".format(
                repeat, stages, found[stages]["samples_per_second"], found[stages]["load"]),
                file=sys.stderr, flush=True)
        runs.append(found)
    first = runs[0][1]
    identical = all(r[s]["generated"] == first["generated"] for r in runs for s in r)
    reference = reload_and_predict(spec["checkpoint"], first["prompts"])
    config = load_config("small", overrides=["layout.stages={}".format(args.stages)] + (
        ["layout.pipeline_schedule={}".format(args.schedule)] if args.schedule else []) + (
        ["validation.generation_micro_batches={}".format(args.micro_batches)] if args.micro_batches else []))
    plan = plan_from_config(config)
    in_flight = slots(config.validation.generation_micro_batches, args.stages)
    rows = spec["eval_batch_size"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    longest = max(len(ids) for ids in tokenizer(first["prompts"])["input_ids"])
    # A whole batch's caches are in flight (its micro-batches), at the longest prompt: an upper bound.
    stage_cache = [cache_bytes(plan.size, plan.stage_blocks[s], rows, longest, spec["max_new_tokens"])
                   for s in range(args.stages)]
    one = [r[1]["samples_per_second"] for r in runs]
    split = [r[args.stages]["samples_per_second"] for r in runs]
    ratios = [s / o for s, o in zip(split, one)]
    print(json.dumps({
        "one_process_samples_per_second": one, "stages_samples_per_second": split, "ratios": ratios,
        "ratio_range": [min(ratios), max(ratios)], "median_ratio": statistics.median(ratios),
        "median_samples_per_second": {"one_process": statistics.median(one), "stages": statistics.median(split)},
        "load_after_each_run": [[r[1]["load"], r[args.stages]["load"]] for r in runs],
        "stages": args.stages, "schedule": plan.schedule, "stage_blocks": plan.stage_blocks,
        "micro_batches_in_flight": in_flight,
        "predictions_identical_across_runs": identical,
        "differing_from_transformers_generate": sum(a != b for a, b in zip(first["generated"], reference)),
        "samples": len(first["generated"]), "accuracy": first["accuracy"],
        "one_process_threads": args.one_process_threads or "torch default",
        "cache_bytes_per_stage_planned": stage_cache}, indent=2))


if __name__ == "__main__":
    main()
