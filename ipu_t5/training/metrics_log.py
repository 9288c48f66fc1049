"""Per-step metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard; events
(a restart) as records with an "event" key."""
import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..checkpointing import atomic


class MetricsLog:
    """Appends step records; a disabled log (non-main processes) writes nothing.

    A run resumed at step `resumed_at` first drops the records of later steps that the
    interrupted run logged after its checkpoint, so every step appears once.
    """

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 resumed_at: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer: Optional[Any] = None
        if enabled and resumed_at is not None and self.path.is_file():
            self._drop_after(resumed_at)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional on the SDK stack
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                            purge_step=None if resumed_at is None else resumed_at + 1)

    def _drop_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed run may be cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic.write_file(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: Dict[str, Any], prefix: str = "train") -> None:
        """Write one record that has a `step`."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar("{}/{}".format(prefix, key), value, record["step"])

    def event(self, record: Dict[str, Any]) -> None:
        """Write one record of something that happened to the run (`record["event"]` names it, its
        `step` says when), which is no metric and so not mirrored to TensorBoard."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
