"""`ipu-t5 predict` killed with kill -9 halfway and started again, against an uninterrupted run.

    python bench/predict_resume.py                       # 10,000 demo rows, tiny model, one process
    python bench/predict_resume.py --rows 2000 --stages 2

Trains a tiny model briefly (`ipu-t5 train`, its export in <workdir>/run/hf), writes `--rows`
unlabelled MNLI demo rows, runs `ipu-t5 predict` once uninterrupted, then again into another file,
SIGKILLs that run once the file holds half the rows, runs the same command again and reports
whether the two files are byte for byte the same and every row id appears exactly once, with the
seconds each run took.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(stages: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if stages > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--workdir", help="kept here (the trained export is reused when present)")
    args = parser.parse_args()
    from bench.workdir import work_directory

    workdir = work_directory(args.workdir, "ipu-t5-predict-resume-")
    env = _env(args.stages)
    export = workdir / "run" / "hf"
    if not (export / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "ipu_t5", "train", "--model", "tiny", "--max-steps", "60",
                        "--output-dir", str(workdir / "run"), "--overwrite", "--set", "validation.do_eval=false",
                        "--set", "output.report_to_tensorboard=false", "--set", "training.global_batch_size=32"],
                       cwd=str(ROOT), env=env, check=True, capture_output=True)
    sys.path.insert(0, str(ROOT))
    from ipu_t5.tasks.demo.mnli import generate_splits

    rows = generate_splits(11, 10, args.rows)["validation_mismatched"]
    data = workdir / "test.jsonl"
    data.write_text("".join(json.dumps({"idx": r["idx"], "premise": r["premise"], "hypothesis": r["hypothesis"]})
                            + "\n" for r in rows))

    def command(out: Path):
        return [sys.executable, "-m", "ipu_t5", "predict", str(export), "--model", "tiny", "--stages", str(args.stages),
                "--data-files", "test={}".format(data), "--out", str(out),
                "--set", "validation.max_new_tokens={}".format(args.max_new_tokens)]

    def run(out: Path) -> float:
        started = time.perf_counter()
        subprocess.run(command(out), cwd=str(ROOT), env=env, check=True, capture_output=True)
        return time.perf_counter() - started

    whole, resumed = workdir / "whole.jsonl", workdir / "resumed.jsonl"
    for path in (whole, resumed):
        if path.exists():
            path.unlink()
    seconds_whole = run(whole)
    started = time.perf_counter()
    # Its own process group: kill -9 reaches torchrun's workers too under --stages.
    proc = subprocess.Popen(command(resumed), cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while _lines(resumed) < args.rows // 2:
        if proc.poll() is not None:
            raise SystemExit("the run ended before it was killed")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    seconds_killed = time.perf_counter() - started
    at_kill = _lines(resumed)
    torn = not resumed.read_bytes().endswith(b"\n")
    seconds_rerun = run(resumed)
    ids = [json.loads(line)["id"] for line in resumed.read_text().splitlines()]
    print(json.dumps({
        "rows": args.rows, "stages": args.stages, "lines_when_killed": at_kill, "torn_last_line": torn,
        "every_row_once": ids == list(range(args.rows)),
        "same_file_as_uninterrupted": resumed.read_bytes() == whole.read_bytes(),
        "seconds_uninterrupted": round(seconds_whole, 1), "seconds_until_killed": round(seconds_killed, 1),
        "seconds_rerun": round(seconds_rerun, 1)}, indent=2))


if __name__ == "__main__":
    main()
