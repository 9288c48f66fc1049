"""ipu-t5: fine-tune Flan-T5 split over accelerators as a pipeline with data parallelism, validate
by generation, and export Hugging Face checkpoints that transformers 4.x and 5.x load."""
from .config import RunConfig, load_config
from .errors import UserError
from .tasks import postprocess_mnli_predictions
from .training.trainer import T5Trainer

__version__ = "0.1.0"

__all__ = ["RunConfig", "T5Trainer", "UserError", "load_config", "postprocess_mnli_predictions", "__version__"]
