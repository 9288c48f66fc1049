"""Where a bench keeps its data, models and runs."""
import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Optional


def work_directory(given: Optional[str], prefix: str) -> Path:
    """`given` (created if missing, kept: reused by the next run), else a new temporary directory
    removed when the bench exits: the models and checkpoints of one bench take gigabytes."""
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, str(path), True)
    return path
