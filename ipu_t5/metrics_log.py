"""Per-step metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""
import json
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsLog:
    """Appends step records; a disabled log (non-main processes) writes nothing."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer: Optional[Any] = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional on the SDK stack
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
