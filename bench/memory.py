"""Peak host memory of every process of a run, measured beside the torch backend's memory plan.

    python bench/memory.py [--layouts 1x1 2x1 4x1 2x2] [--record] [--json] [--quick]

A flan-t5-base-shaped model (T5Config of google/flan-t5-base: d_model 768, d_ff 2048, 12 + 12
layers, 12 heads, vocabulary 32128, gated-GELU, untied LM head) with random weights is saved with
`save_pretrained` (and the demo tokenizer beside it) and passed as `--pretrained`; `ipu-t5 train`
runs on the demo data, global batch 8, 2 steps, validation on a few prompts, a checkpoint and the
export (with its reload check) at the end, once per layout (stages x replicas; 2x2 under FSDP2).
The resident set size (psutil RSS) of every process of the run's tree is sampled every 0.1 s:
the largest process's peak and the peak of their sum are printed beside the plan's
(`ipu_t5/backends/torch_distributed/memory.py`, CPU processes on this host), with ratios to one
process. Numbers are printed, never asserted; `--record` writes them into bench/RESULTS.md.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Memory of each process under the split (`python bench/memory.py`"
STEPS = 2
GLOBAL_BATCH = 8
SAMPLE_SECONDS = 0.1


def _layout(text: str):
    stages, replicas = (int(v) for v in text.lower().split("x"))
    return stages, replicas


def save_model(directory: Path, size_name: str) -> None:
    """Random weights of the size's architecture and the demo tokenizer, as a Hugging Face directory."""
    import torch
    from transformers import T5Config

    from ipu_t5.models import canonical_size, model_from_config
    from ipu_t5.tasks import get_task
    from ipu_t5.tasks.demo.mnli import generate_splits
    from ipu_t5.tokenizer import demo_tokenizer

    torch.manual_seed(0)
    model = model_from_config(T5Config(**canonical_size(size_name).t5_config_kwargs()))
    model.save_pretrained(str(directory))
    task, rows = get_task("mnli"), generate_splits(0, 600, 60)["train"]
    tokenizer = demo_tokenizer([task.source_text(r) for r in rows] + [task.target_text(r) for r in rows], 512)
    tokenizer.save_pretrained(str(directory))


def run_overrides(stages: int, replicas: int, eval_samples: int, extra: Sequence[str] = ()) -> List[str]:
    """The `--set` values of a bench run (also what the plan is computed for)."""
    values = ["data.source=demo", "data.demo_train_samples=256", "data.demo_eval_samples={}".format(eval_samples),
              "training.global_batch_size={}".format(GLOBAL_BATCH), "output.save_steps={}".format(STEPS),
              "model.dropout_rate=0", "validation.per_device_eval_batch_size=32",
              "output.report_to_tensorboard=false", "layout.backend={}".format(
                  "torch" if stages * replicas > 1 else "single")]
    if replicas > 1:
        values.append("layout.data_parallel=fsdp")
    return values + list(extra)


class Sampler(threading.Thread):
    """RSS of a process and all its descendants every SAMPLE_SECONDS: each one's peak and the
    peak of their sum."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.peaks: Dict[int, int] = {}
        self.ranks: Dict[int, Optional[str]] = {}
        self.peak_sum = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    if self.ranks.get(proc.pid) is None:
                        # torchrun gives each worker its global rank in RANK (read again until set:
                        # a process just started may not show its environment yet).
                        self.ranks[proc.pid] = proc.environ().get("RANK")
                except psutil.Error:
                    continue
                total += rss
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self.peak_sum = max(self.peak_sum, total)
            time.sleep(SAMPLE_SECONDS)


def measure(model_dir: Path, size_name: str, stages: int, replicas: int, workdir: Path,
            eval_samples: int, extra: Sequence[str] = ()) -> Dict[str, object]:
    """Run one layout and sample its processes' memory."""
    out = workdir / "run-{}x{}".format(stages, replicas)
    command = [sys.executable, "-m", "ipu_t5", "train", "--model", size_name, "--pretrained", str(model_dir),
               "--task", "mnli", "--max-steps", str(STEPS), "--output-dir", str(out), "--overwrite",
               "--stages", str(stages), "--replicas", str(replicas)]
    for value in run_overrides(stages, replicas, eval_samples, extra):
        command += ["--set", value]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    started = time.time()
    log = open(workdir / "run-{}x{}.log".format(stages, replicas), "w")
    proc = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    code = proc.wait()
    sampler.stop.set()
    sampler.join()
    log.close()
    if code != 0:
        tail = (workdir / "run-{}x{}.log".format(stages, replicas)).read_text()[-3000:]
        raise SystemExit("the {}x{} run failed (exit {}):\n{}".format(stages, replicas, code, tail))
    # The trainer's start-up line: "prompts up to S tokens, targets up to T".
    found = re.search(r"prompts up to (\d+) tokens, targets up to (\d+)",
                      (workdir / "run-{}x{}.log".format(stages, replicas)).read_text())
    # The launcher is the root process; the ranks are the python processes below it (a rank's own
    # children inherit its RANK: the rank is the largest of them).
    ranks: Dict[int, int] = {}
    for pid, peak in sampler.peaks.items():
        if pid != proc.pid and sampler.ranks.get(pid) is not None:
            rank = int(sampler.ranks[pid])
            ranks[rank] = max(ranks.get(rank, 0), peak)
    # A base-shaped run leaves 3.7 GB of checkpoints and export behind.
    shutil.rmtree(str(out), ignore_errors=True)
    return {"layout": "{}x{}".format(stages, replicas), "stages": stages, "replicas": replicas,
            "seconds": round(time.time() - started, 1), "largest_bytes": max(sampler.peaks.values()),
            "sum_bytes": sampler.peak_sum, "launcher_bytes": sampler.peaks[proc.pid] if ranks else 0,
            "rank_peaks_bytes": [ranks[r] for r in sorted(ranks)] if ranks else [sampler.peaks[proc.pid]],
            "source_length": int(found.group(1)), "target_length": int(found.group(2)), "overrides": list(extra)}


def planned(size_name: str, model_dir: Path, row: Dict[str, object], eval_samples: int) -> Dict[str, int]:
    """The plan's largest process and sum for the layout of `row`, as CPU processes on this host."""
    from ipu_t5.backends.batch_search import fitted_plan
    from ipu_t5.backends.torch_distributed.memory import lightest_cut, plan_memory
    from ipu_t5.config import load_config

    stages, replicas = int(row["stages"]), int(row["replicas"])
    overrides = run_overrides(stages, replicas, eval_samples, row.get("overrides", [])) + [
        "model.pretrained={}".format(model_dir), "layout.stages={}".format(stages),
        "layout.replicas={}".format(replicas)]
    config = load_config(size_name, overrides=overrides)
    source, target = int(row["source_length"]), int(row["target_length"])
    # The cut `ipu-t5 train` takes on CPU processes (the torch backend's default), and the micro-batch
    # it picks under training.auto_find_batch_size.
    layout = fitted_plan(config, source, target, lambda c: lightest_cut(c, source, target, "cpu"))
    plan = plan_memory(config, source, target, device="cpu", layout=layout)
    return {"largest_bytes": plan.largest_process_bytes, "sum_bytes": plan.node_sum_bytes(),
            "rank_peaks_bytes": [r.peak for r in plan.ranks]}


def _by_rank(row: Dict[str, object]) -> str:
    """The range of the plan's peak over the measured peak, rank by rank."""
    measured, plan = row["rank_peaks_bytes"], row["plan"]["rank_peaks_bytes"]
    if len(measured) != len(plan):
        return "-"
    ratios = [p / m for p, m in zip(plan, measured)]
    return "{:.2f}".format(ratios[0]) if len(ratios) == 1 else "{:.2f} .. {:.2f}".format(min(ratios), max(ratios))


def table(rows: List[Dict[str, object]]) -> str:
    one = next((r for r in rows if r["layout"] == "1x1"), rows[0])
    gb = lambda n: "{:.2f}".format(n / 1e9)  # noqa: E731
    header = ["layout", "largest GB", "(x 1 proc)", "sum GB", "(x 1 proc)", "plan largest GB", "plan sum GB",
              "plan/measured largest", "plan/measured sum", "plan/measured by rank", "seconds"]
    lines = []
    for r in rows:
        label = " ".join([r["layout"]] + list(r.get("overrides", [])))
        lines.append([label, gb(r["largest_bytes"]), "{:.2f}".format(r["largest_bytes"] / one["largest_bytes"]),
                      gb(r["sum_bytes"]), "{:.2f}".format(r["sum_bytes"] / one["sum_bytes"]),
                      gb(r["plan"]["largest_bytes"]), gb(r["plan"]["sum_bytes"]),
                      "{:.2f}".format(r["plan"]["largest_bytes"] / r["largest_bytes"]),
                      "{:.2f}".format(r["plan"]["sum_bytes"] / r["sum_bytes"]), _by_rank(r), str(r["seconds"])])
    widths = [max(len(x[i]) for x in lines + [header]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(line) for line in lines])


def record(text: str, seconds: float) -> None:
    """Replace (or append) this bench's section of bench/RESULTS.md."""
    path = ROOT / "bench" / "RESULTS.md"
    body = path.read_text()
    note = ("One run per layout (the default split of `ipu_t5/layout.py`; 2x2 under FSDP2), every process's peak "
            "resident memory beside the plan's (`ipu-t5 plan --backend torch` for CPU processes at the runs' prompt "
            "and target lengths; the plan's sum counts each process at its own peak). Seconds are wall time on a "
            "machine other jobs shared.")
    section = "{}, {:.0f} s)\n\n{}\n\n```\n{}\n```\n".format(SECTION, seconds, note, text)
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    body = pattern.sub(lambda _: section.rstrip("\n"), body) if pattern.search(body) else \
        body.rstrip("\n") + "\n\n" + section
    path.write_text(body if body.endswith("\n") else body + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "2x2"],
                        help="stages x replicas (2x2 and other replicated layouts under FSDP2)")
    parser.add_argument("--quick", action="store_true", help="the tiny shape instead of base (a smoke test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, as `ipu-t5 train --set` takes it "
                             "(e.g. layout.fsdp_reshard_after_forward=false)")
    parser.add_argument("--eval-samples", type=int, default=64, help="validation prompts (the reload check's)")
    parser.add_argument("--workdir", help="where the model and the runs go (default: a temporary directory)")
    parser.add_argument("--reuse", help="a --json output of an earlier run: re-plan its measurements, run nothing")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args(argv)
    size_name = "tiny" if args.quick else "base"
    started = time.time()
    from bench.workdir import work_directory

    workdir = work_directory(args.workdir, "ipu-t5-memory-")
    model_dir = workdir / "model-{}".format(size_name)
    if args.reuse:
        rows = json.loads(Path(args.reuse).read_text())["layouts"]
    else:
        if not (model_dir / "config.json").is_file():
            save_model(model_dir, size_name)
        rows = []
        for text in args.layouts:
            rows.append(measure(model_dir, size_name, *_layout(text), workdir, args.eval_samples, args.overrides))
            # Kept as they come: a later --reuse re-plans them without running again.
            (workdir / "measured.json").write_text(json.dumps({"layouts": rows}, indent=2))
    for row in rows:
        row["plan"] = planned(size_name, model_dir, row, args.eval_samples)
    import torch

    machine = "{} cores, {:.0f} GiB, Python {}, torch {}".format(
        os.cpu_count(), __import__("psutil").virtual_memory().total / 2 ** 30, platform.python_version(),
        torch.__version__)
    heading = ("peak RSS of the run's processes (psutil, every {} s), flan-t5-{}-shaped random weights from "
               "--pretrained, demo data, global batch {}, {} steps, checkpoint and export at the end; {}".format(
                   SAMPLE_SECONDS, size_name, GLOBAL_BATCH, STEPS, machine))
    text = heading + "\n" + table(rows)
    if args.json:
        print(json.dumps({"model": size_name, "machine": machine, "layouts": rows}, indent=2))
    else:
        print(text)
    if args.record:
        # The runs' own seconds: a --reuse of earlier measurements records what they took.
        record(text, sum(float(r["seconds"]) for r in rows) if args.reuse else time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
