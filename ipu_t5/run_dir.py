"""The output directory: one run per directory, never silently mixed with another."""
import shutil
from pathlib import Path
from typing import Any, Dict

import yaml

from .errors import UserError

RECORD = "run_config.yaml"
# What a run writes; --overwrite removes exactly these and nothing else the user keeps there.
ARTIFACTS = (RECORD, "metrics.jsonl", "eval_results.json", "eval_predictions.jsonl", "hf", "adapter",
             "checkpoints", "tensorboard", "summary.json", "loss_curve.png", "eval_scores.png")
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


def claim(path: Path, config: Dict[str, Any], overwrite: bool) -> None:
    """Make `path` this run's directory.

    A directory holding another run (or files this project did not write) is refused unless
    `overwrite`, which removes only this project's artifacts.
    """
    path = Path(path)
    record = path / RECORD
    if path.exists() and not path.is_dir():
        raise UserError("output directory '{}' is a file: choose another --output-dir.".format(path))
    if path.is_dir() and any(path.iterdir()):
        same = False
        if record.is_file():
            old = yaml.safe_load(record.read_text()) or {}
            same = identity(old) == identity(config)
            why = "holds a different run ({})".format(_differences(identity(old), identity(config)))
        else:
            why = "is not empty and holds no ipu-t5 run"
        if not same:
            if not overwrite:
                raise UserError("output directory '{}' {}. Use --overwrite to replace it, or choose another "
                                "--output-dir.".format(path, why))
            for name in ARTIFACTS:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(str(target))
                elif target.exists():
                    target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(config, sort_keys=False))
