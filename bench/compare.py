"""ipu-t5 against Hugging Face's Seq2SeqTrainer: the same model, data and settings, one machine,
in float32 and in bfloat16 autocast.

    python bench/compare.py            # tiny and flan-t5-small-shaped models, 3 repeats each
    python bench/compare.py --quick    # tiny only, fewer steps
    python bench/compare.py --json     # the same figures as JSON
    python bench/compare.py --precisions float32   # one precision only

For each model the script builds MNLI-shaped data (bench/mnli_shaped.py), a tokenizer trained on
it, and a checkpoint in the registry's dimensions (random initialisation, then a short ipu-t5
fine-tune so that validation generates real labels). Then, for every repeat, each side runs in a
fresh process of its own (bench/sides.py): train one epoch of `steps` global batches from the
checkpoint, validate the checkpoint's weights by greedy generation. Every figure is the median
over the repeats; peak memory is each process's own high-water mark. Every repeat runs each side
at each precision (ours with `training.bf16`, validation following it; the peer with `bf16=True`,
its own CPU autocast, or float32), in an order that rotates between repeats, so a machine that
slows down during the run favours none of them. Beside them the CPU's float32 and bfloat16 matrix
rates at the model's shapes (bench/matrix_rates.py) bound what either side can reach.

Ratios are ours over the peer at the same precision, and default against default: ours as it runs
with `training.bf16` unset (bfloat16 where the CPU multiplies in it, float32 on the tiny preset)
against the peer's default, float32.

The peer runs with its best ordinary settings (length grouping on, its default optimizer);
`--peer-defaults` adds a third side, Seq2SeqTrainer with length grouping left off, as most
scripts run it. The ratios are always against the best-settings peer.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Per model: global batch, training steps (one epoch of the training file), validation samples
# and batch, and the fine-tune that makes the shared checkpoint generate labels.
MODELS = {
    "tiny": {"global_batch_size": 32, "steps": 40, "eval_samples": 1200, "eval_batch_size": 64,
             "learning_rate": 1e-3, "prepare_steps": 150},
    "small": {"global_batch_size": 32, "steps": 12, "eval_samples": 512, "eval_batch_size": 64,
              "learning_rate": 3e-4, "prepare_steps": 60},
}
QUICK = {"tiny": {"steps": 24, "eval_samples": 600, "prepare_steps": 100}}
METRICS = ("train_tokens_per_second", "train_tokens_per_cpu_second", "eval_samples_per_second",
           "eval_samples_per_cpu_second", "peak_rss_mb", "peak_gpu_mb", "accuracy", "mean_loss")
LABELS = {"ours": "ipu-t5", "peer": "Seq2SeqTrainer", "peer-defaults": "Seq2SeqTrainer, no length grouping"}
PRECISIONS = ("float32", "bfloat16")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_settings(model: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The optimizer settings both sides use."""
    return {"max_steps": settings["steps"], "global_batch_size": settings["global_batch_size"],
            "learning_rate": settings["learning_rate"], "weight_decay": 0.0, "max_grad_norm": 1.0,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 42, "adam_beta1": 0.9,
            "adam_beta2": 0.999, "adam_epsilon": 1e-8, "logging_steps": 10}


def prepare(model: str, settings: Dict[str, Any], workdir: Path, ours_extra: Dict[str, Any]) -> Dict[str, Any]:
    """Data files, tokenizer and the shared checkpoint for one model; returns the workers' spec."""
    import torch
    from transformers import T5Config

    from bench.mnli_shaped import mnli_shaped_splits, write_jsonl
    from ipu_t5.config import load_config
    from ipu_t5.data.features import lengths
    from ipu_t5.models import canonical_size, model_from_config
    from ipu_t5.tasks import get_task
    from ipu_t5.tokenizer import demo_tokenizer
    from ipu_t5.training.trainer import T5Trainer

    task = get_task("mnli")
    training = training_settings(model, settings)
    # One epoch: every side trains on exactly the same examples, whatever order it picks.
    train_size = training["max_steps"] * settings["global_batch_size"]
    splits = mnli_shaped_splits(42, train_size, settings["eval_samples"])
    train_file = write_jsonl(splits["train"], workdir / "train.jsonl")
    eval_file = write_jsonl(splits["validation_mismatched"], workdir / "validation.jsonl")
    rows = splits["train"]
    tokenizer = demo_tokenizer([task.source_text(r) for r in rows] + [task.target_text(r) for r in rows], 32128)
    size = canonical_size(model)
    torch.manual_seed(0)
    network = model_from_config(T5Config(**size.t5_config_kwargs()))
    base = {"output.report_to_tensorboard": "false", "data.source": "files",
            "data.data_files": "{{train: {}, validation: {}}}".format(train_file, eval_file),
            "data.eval_split": "validation", "model.tokenizer": None}
    overrides = dict(base, **{"output.output_dir": str(workdir / "prepare"), "training.max_steps": settings["prepare_steps"],
                              "training.global_batch_size": settings["global_batch_size"],
                              "training.learning_rate": settings["learning_rate"], "validation.do_eval": "false",
                              "training.bf16": "false"})
    _log("[{}] fine-tuning the shared checkpoint for {} steps".format(model, settings["prepare_steps"]))
    config = load_config(model, overrides=["{}={}".format(k, v) for k, v in overrides.items() if v is not None])
    trainer = T5Trainer(config, pretrained=network, tokenizer=tokenizer)
    trainer.train()
    checkpoint = trainer.export_hf(workdir / "checkpoint")
    cap = lengths(trainer.train_features).target
    trainer.close()
    # Length grouping on, as the peer runs it (both default to off).
    ours = dict(base, **{"output.output_dir": str(workdir / "ours"), "output.overwrite_output_dir": "true",
                         "data.group_by_length": "true",
                         "model.pretrained": str(checkpoint), "model.tokenizer": str(checkpoint),
                         "validation.per_device_eval_batch_size": settings["eval_batch_size"],
                         "validation.max_new_tokens": cap})
    ours.update(ours_extra)
    return {"model": model, "checkpoint": str(checkpoint), "train_file": str(train_file), "eval_file": str(eval_file),
            "training": training, "eval_batch_size": settings["eval_batch_size"], "max_new_tokens": cap,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "bf16": False,
            "peer_dataloader_workers": settings["peer_workers"],
            "ours_overrides": {k: v for k, v in ours.items() if v is not None}}


def run_side(side: str, spec_path: Path) -> Dict[str, Any]:
    """One side in a fresh process; its last stdout line is the JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = json.loads(spec_path.read_text()).get("threads")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("the {} side failed:\n{}".format(side, done.stderr[-4000:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(ours: Dict[str, float], peer: Dict[str, float], memory: str) -> Dict[str, float]:
    return {"train_speedup": ours["train_tokens_per_second"] / peer["train_tokens_per_second"],
            "eval_speedup": ours["eval_samples_per_second"] / peer["eval_samples_per_second"],
            # On a GPU the memory that limits a run is the GPU's.
            "memory_ratio": ours[memory] / peer[memory],
            "train_speedup_cpu": ours["train_tokens_per_cpu_second"] / peer["train_tokens_per_cpu_second"],
            "eval_speedup_cpu": ours["eval_samples_per_cpu_second"] / peer["eval_samples_per_cpu_second"]}


def measure(spec: Dict[str, Any], workdir: Path, repeats: int, sides: List[str], precisions: List[str],
            ours_default: str) -> Dict[str, Any]:
    """Every side at every precision `repeats` times, rotating the order; medians and ratios to the
    peer at the same precision, and ours at `ours_default` against the peer in float32."""
    order = [(side, precision) for precision in precisions for side in sides]
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {p: {side: [] for side in sides} for p in precisions}
    for repeat in range(repeats):
        # A seed per repeat: each side's batch order (and so its padding) is that seed's luck,
        # and the medians average over several orders, not one.
        training = dict(spec["training"], seed=spec["training"]["seed"] + repeat)
        paths = {}
        for precision in precisions:
            paths[precision] = workdir / "spec-{}-{}.json".format(repeat, precision)
            paths[precision].write_text(json.dumps(dict(spec, training=training, bf16=precision == "bfloat16"),
                                                   indent=2))
        shift = repeat % len(order)
        for side, precision in order[shift:] + order[:shift]:
            result = run_side(side, paths[precision])
            _log("[{}] repeat {} {} {}: {}".format(spec["model"], repeat + 1, side, precision, json.dumps(
                {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})))
            runs[precision][side].append(result)
    memory = "peak_gpu_mb" if spec["device"] == "cuda" else "peak_rss_mb"
    report: Dict[str, Any] = {}
    for precision, by_side in runs.items():
        medians = {side: {m: statistics.median(r[m] for r in results) for m in METRICS if m in results[0]}
                   for side, results in by_side.items()}
        report[precision] = dict(medians, **_compare(medians["ours"], medians["peer"], memory), **{
            "runs": by_side,
            "ranges": {side: {m: [min(r[m] for r in results), max(r[m] for r in results)]
                              for m in ("train_tokens_per_second", "eval_samples_per_second")}
                       for side, results in by_side.items()},
            "same_accuracy": len({r["accuracy"] for results in by_side.values() for r in results}) == 1,
            "same_train_tokens": len({r["train_tokens"] for results in by_side.values() for r in results}) == 1})
    if ours_default in report and "float32" in report:
        report["default"] = dict(_compare(report[ours_default]["ours"], report["float32"]["peer"], memory),
                                 ours_precision=ours_default, peer_precision="float32")
    report["settings"] = {k: spec[k] for k in ("training", "eval_batch_size", "max_new_tokens", "device")}
    return report


def ours_default_precision(model: str) -> str:
    """What ipu-t5 computes in on this machine with training.bf16 unset, for the model's preset."""
    import torch

    from ipu_t5.backends.precision import autocast_dtype
    from ipu_t5.config import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = autocast_dtype(load_config(model).training.bf16, device)
    return "bfloat16" if dtype is not None else "float32"


def machine() -> Dict[str, Any]:
    """What the figures were measured on."""
    import datasets
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "load_average": list(os.getloadavg())}


def table(report: Dict[str, Any]) -> str:
    """The comparison as a Markdown table: medians per precision, ours over the peer at the same
    precision, then default against default; the matrix rates below."""
    lines = ["| model | precision | side | train tokens/s | (per CPU-s) | validation samples/s | (per CPU-s) "
             "| peak RSS (MB) | accuracy | mean train loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, result in report["models"].items():
        for precision in PRECISIONS:
            if precision not in result:
                continue
            measured = result[precision]
            for side in (s for s in LABELS if s in measured):
                m = measured[side]
                lines.append("| {} | {} | {} | {:.0f} | {:.0f} | {:.1f} | {:.1f} | {:.0f} | {:.2%} | {:.4f} |".format(
                    model, precision, LABELS[side], m["train_tokens_per_second"], m["train_tokens_per_cpu_second"],
                    m["eval_samples_per_second"], m["eval_samples_per_cpu_second"], m["peak_rss_mb"], m["accuracy"],
                    m["mean_loss"]))
            lines.append("| {} | {} | **ipu-t5 / Seq2SeqTrainer** | **{:.2f}x** | {:.2f}x | **{:.2f}x** | {:.2f}x "
                         "| **{:.2f}** | {} | |".format(
                             model, precision, measured["train_speedup"], measured["train_speedup_cpu"],
                             measured["eval_speedup"], measured["eval_speedup_cpu"], measured["memory_ratio"],
                             "identical" if measured["same_accuracy"] else "differs"))
        if "default" in result:
            d = result["default"]
            lines.append("| {} | defaults | **ipu-t5 ({}) / Seq2SeqTrainer (float32)** | **{:.2f}x** | {:.2f}x "
                         "| **{:.2f}x** | {:.2f}x | **{:.2f}** | | |".format(
                             model, d["ours_precision"], d["train_speedup"], d["train_speedup_cpu"], d["eval_speedup"],
                             d["eval_speedup_cpu"], d["memory_ratio"]))
    lines.append("")
    for model, result in report["models"].items():
        rates = result.get("matrix_gflops")
        if rates:
            lines.append("{}: matrix products at its shapes (2048 rows): {}".format(model, "; ".join(
                "{} {:.0f} GFLOP/s ({:.0f} to {:.0f}; {:.0f} per CPU-second)".format(
                    p, r["gflops"], r["min_gflops"], r["max_gflops"], r["gflops_per_cpu_second"])
                for p, r in rates.items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer steps")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--models", help="comma-separated sizes (default: tiny,small; --quick: tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; figures are medians")
    parser.add_argument("--steps", type=int, help="timed training steps (overrides the per-model default)")
    parser.add_argument("--eval-samples", type=int, help="validation samples (overrides the per-model default)")
    parser.add_argument("--prepare-steps", type=int, help="fine-tuning steps of the shared checkpoint")
    parser.add_argument("--peer-workers", type=int, default=0, help="the peer's dataloader_num_workers")
    parser.add_argument("--peer-defaults", action="store_true",
                        help="also run Seq2SeqTrainer without length grouping (its default)")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's, one per core)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated: float32, bfloat16 (default: both, alternating)")
    parser.add_argument("--set", dest="ours", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an extra ipu-t5 setting for our side (repeatable)")
    parser.add_argument("--workdir", help="keep data, checkpoints and specs here (default: a temporary directory)")
    parser.add_argument("--worker", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from bench.sides import SIDES

        print(json.dumps(SIDES[args.worker](json.loads(Path(args.spec).read_text()))))
        return 0
    models = (args.models or ("tiny" if args.quick else "tiny,small")).split(",")
    precisions = args.precisions.split(",")
    if not set(precisions) <= set(PRECISIONS):
        parser.error("--precisions takes {}, got '{}'".format(", ".join(PRECISIONS), args.precisions))
    ours_extra = dict(item.split("=", 1) for item in args.ours)
    from bench.workdir import work_directory

    workdir = work_directory(args.workdir, "ipu-t5-bench-")
    os.environ.setdefault("IPU_T5_CACHE", str(workdir / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: Dict[str, Any] = {"machine": machine(), "models": {}}
    for model in models:
        if model not in MODELS:
            parser.error("--models takes {}, got '{}'".format(", ".join(MODELS), model))
        settings = dict(MODELS[model], **(QUICK.get(model, {}) if args.quick else {}), peer_workers=args.peer_workers)
        if args.steps:
            settings["steps"] = args.steps
        if args.eval_samples:
            settings["eval_samples"] = args.eval_samples
        if args.prepare_steps:
            settings["prepare_steps"] = args.prepare_steps
        directory = workdir / model
        directory.mkdir(exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the table or the JSON
            spec = dict(prepare(model, settings, directory, ours_extra), threads=args.threads)
        sides = ["ours", "peer"] + (["peer-defaults"] if args.peer_defaults else [])
        report["models"][model] = measure(spec, directory, args.repeats, sides, precisions,
                                          ours_default_precision(model))
        from bench.matrix_rates import matrix_rates

        report["models"][model]["matrix_gflops"] = matrix_rates(model)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    # The headline ratios are the worst case over the models and precisions measured.
    results = [r[p] for r in report["models"].values() for p in precisions]
    report["train_speedup"] = min(r["train_speedup"] for r in results)
    report["eval_speedup"] = min(r["eval_speedup"] for r in results)
    report["memory_ratio"] = max(r["memory_ratio"] for r in results)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print("{} ({} cores, torch {} with {} threads, transformers {}); load average {:.1f} at start, {:.1f} at end; "
              "{:.0f} s".format(m["gpu"] or m["cpu"], m["cores"], m["torch"], m["torch_threads"], m["transformers"],
                                m["load_average"][0], m["load_average_end"][0], report["seconds"]))
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
