"""ipu-t5: fine-tune Flan-T5 split over accelerators as a pipeline with data parallelism, validate
by generation, and export Hugging Face checkpoints that transformers 4.x and 5.x load.

The public names are imported on first use (PEP 562): `ipu-t5`'s launcher, which only starts the
ranks of a multi-process run, and every rank then pay for torch and transformers only where
they use them (the launcher not at all for transformers)."""
import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "RunConfig": "ipu_t5.config",
    "load_config": "ipu_t5.config",
    "UserError": "ipu_t5.errors",
    "postprocess_mnli_predictions": "ipu_t5.tasks",
    "T5Trainer": "ipu_t5.training.trainer",
}

__all__ = ["RunConfig", "T5Trainer", "UserError", "load_config", "postprocess_mnli_predictions", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError("module 'ipu_t5' has no attribute '{}'".format(name))


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
