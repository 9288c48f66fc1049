"""The output directory: one run per directory, never silently mixed with another."""
import shutil
from pathlib import Path
from typing import Any, Dict

import yaml

from ..errors import UserError
from .lock import LOCK_FILE

RECORD = "run_config.yaml"
# What a run writes; --overwrite removes exactly these and nothing else the user keeps there.
ARTIFACTS = (RECORD, "metrics.jsonl", "eval_results.json", "eval_predictions.jsonl", "hf", "adapter",
             "checkpoints", "tensorboard", "summary.json", "loss_curve.png", "eval_scores.png")
# Multi-process launches keep every rank's output here; kept by --overwrite, and a directory
# holding only these logs (and the writer's lock) counts as empty.
LOGS = "logs"
BESIDE_A_RUN = (LOGS, LOCK_FILE)
# Keys that may change between invocations of the same run (continuing, re-splitting, evaluating).
MUTABLE = {"training": ("max_steps", "logging_steps"), "model": ("pretrained",)}
MUTABLE_SECTIONS = ("validation", "layout", "output")


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a config that makes a run what it is."""
    kept = {}
    for section, values in config.items():
        if section in MUTABLE_SECTIONS:
            continue
        kept[section] = {k: v for k, v in values.items() if k not in MUTABLE.get(section, ())}
    return kept


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    diffs = []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key)
            if before != value:
                diffs.append("{}.{}: {!r} -> {!r}".format(section, key, before, value))
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def holds_other_run(path: Path, config: Dict[str, Any], overwrite: bool) -> bool:
    """Whether `path` holds another run (or files this project did not write), which only
    `overwrite` may replace; without it that is refused. Reads only."""
    path = Path(path)
    record = path / RECORD
    if path.exists() and not path.is_dir():
        raise UserError("output directory '{}' is a file: choose another --output-dir.".format(path))
    if not (path.is_dir() and any(p.name not in BESIDE_A_RUN for p in path.iterdir())):
        return False
    if record.is_file():
        old = yaml.safe_load(record.read_text()) or {}
        if identity(old) == identity(config):
            return False
        why = "holds a different run ({})".format(_differences(identity(old), identity(config)))
    else:
        why = "is not empty and holds no ipu-t5 run"
    if not overwrite:
        raise UserError("output directory '{}' {}. Use --overwrite to replace it, or choose another "
                        "--output-dir.".format(path, why))
    return True


def claim(path: Path, config: Dict[str, Any], overwrite: bool) -> None:
    """Make `path` this run's directory: another run there is refused, or with `overwrite` its
    artifacts (only those) are removed; then the run's record is written."""
    path = Path(path)
    if holds_other_run(path, config, overwrite):
        clear(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD).write_text(yaml.safe_dump(config, sort_keys=False))


def clear(path: Path) -> None:
    """Remove what a run wrote in `path`, and nothing else."""
    for name in ARTIFACTS:
        target = Path(path) / name
        if target.is_dir():
            shutil.rmtree(str(target))
        elif target.exists():
            target.unlink()
