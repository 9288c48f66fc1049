"""Typed run configuration: dataclasses, YAML presets, command-line overrides, validation.

Everything the user can set lives here and is checked once, when the config is built. The rest of
the package trusts a `RunConfig` and never re-validates it.

Precedence, lowest first: dataclass defaults, the preset of `--model`, `--config FILE`, flags and
`--set section.key=value`.
"""
import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union, get_type_hints

import yaml

from .errors import UserError


@dataclass
class ModelConfig:
    """Which Flan-T5 and how to build it."""

    name: str = "tiny"
    # Hub id or local directory (an earlier export works too); None means the registry's hub id,
    # or a random initialisation for sizes that have none (tiny).
    pretrained: Optional[str] = None
    # None means the tokenizer that belongs to `pretrained`, or the project's demo tokenizer.
    tokenizer: Optional[str] = None
    # None keeps the checkpoint's own dropout.
    dropout_rate: Optional[float] = None


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens."""

    task: str = "mnli"
    # demo: generated offline; hub: datasets.load_dataset; files: `data_files`.
    source: str = "demo"
    data_files: Dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    # None: the task's own (validation_mismatched for MNLI, validation for the others).
    eval_split: Optional[str] = None
    # None: the longest tokenized prompt in the data, capped at the model's 512.
    max_source_length: Optional[int] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    demo_train_samples: int = 6000
    demo_eval_samples: int = 600
    # Processes that tokenize (datasets.map num_proc); None tokenizes in this process.
    preprocessing_num_workers: Optional[int] = None
    # Tokenized splits are cached under $IPU_T5_CACHE/features; true tokenizes again.
    overwrite_cache: bool = False
    # Batches of similar prompt lengths (Hugging Face's group_by_length): MNLI prompts vary
    # several-fold in length, so batches padded to their longest waste far less compute. Off by
    # default, as in Hugging Face: batches of one length can also be of one kind (the demo's
    # validation accuracy drops from 94.7% to 89.2% with it), which small data sets feel.
    group_by_length: bool = False
    dataloader_num_workers: int = 0
    # Page-locked host batches, copied to a GPU without blocking (ignored off the GPU).
    dataloader_pin_memory: bool = True


@dataclass
class TrainingConfig:
    """Optimisation, named as in Hugging Face's TrainingArguments."""

    max_steps: int = 300
    # The whole step's batch over all replicas and micro-batches.
    global_batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    max_grad_norm: float = 1.0
    seed: int = 42
    # None: bfloat16 autocast where the GPU supports it, float32 elsewhere.
    bf16: Optional[bool] = None
    # float16 is the IPU's training precision (None: float16 on the IPU, off elsewhere, where T5
    # overflows in it).
    fp16: Optional[bool] = None
    logging_steps: int = 10
    # torch.compile the training forward (single-process backend). Off by default: on CPUs it
    # compiles for minutes before it pays back, and torch 2.0.1 cannot compile on Python 3.11+.
    torch_compile: bool = False


@dataclass
class TaskConfig:
    """Adjusts the task named by `data.task`, or defines one that is not registered; None keeps
    the registered task's own setting."""

    # A str.format template over the data's column names, e.g. "summarize: {document}".
    input_template: Optional[str] = None
    target_column: Optional[str] = None
    # A local evaluate module under ipu_t5/metrics (rouge, exact_match) or a directory holding one.
    metric: Optional[str] = None
    # How generated text becomes a prediction: strip | lower.
    postprocess: Optional[str] = None


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning through `peft`, named as in its LoraConfig."""

    # none: every weight trains; lora: only low-rank adapters on `target_modules` train.
    method: str = "none"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # T5's attention projections are q, k, v, o; its feed-forward wi_0, wi_1, wo.
    target_modules: List[str] = field(default_factory=lambda: ["q", "v"])


@dataclass
class ValidationConfig:
    """Generation-based validation."""

    do_eval: bool = True
    per_device_eval_batch_size: int = 64
    # None: the longest tokenized target plus its end-of-sequence token.
    max_new_tokens: Optional[int] = None
    # Validate every N training steps as well as at the end; None: only at the end.
    eval_steps: Optional[int] = None
    # The validation result that ranks evaluations (`trainer.best_metric`) and keeps the best
    # checkpoint; None: the task's lead score (accuracy for MNLI, rougeL for summarization, ...).
    metric_for_best_model: Optional[str] = None
    # None: greater is better unless the metric is a loss (Hugging Face's rule).
    greater_is_better: Optional[bool] = None
    # Stop training after this many validations in a row without improvement; None: never.
    early_stopping_patience: Optional[int] = None
    # How much the metric must improve to count as an improvement.
    early_stopping_threshold: float = 0.0


@dataclass
class LayoutConfig:
    """How the model and the batch are split: stages x replicas, micro-batches."""

    # auto | single | torch | ipu
    backend: str = "auto"
    stages: int = 1
    replicas: int = 1
    # Give at most one of these two; the other follows from the global batch.
    micro_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    # Encoder and decoder blocks per stage, counted together (optimum-graphcore's layers_per_ipu).
    layers_per_stage: Optional[List[int]] = None
    pipeline_schedule: str = "1F1B"
    data_parallel: str = "ddp"
    # Seconds a torch.distributed collective may wait before the run fails instead of hanging.
    ddp_timeout: int = 1800


@dataclass
class IpuConfig:
    """Graphcore IPU settings, named as in optimum-graphcore's IPUConfig where a name exists.

    The IPUs per replica and the replicas are `layout.stages` / `layout.replicas`
    (`ipus_per_replica` / `replication_factor`); gradient accumulation is the layout's.
    """

    # auto: pipelined when every IPU holds its stage on chip, else phased with weights streamed.
    execution_strategy: str = "auto"
    # Share of each IPU's memory that matmuls may use for temporaries (available memory proportion).
    matmul_proportion: float = 0.2
    # The shared embedding and the LM head split into this many vocabulary slices; None: the
    # smallest power of two the memory plan needs.
    embedding_serialization_factor: Optional[int] = None
    recompute_checkpoint_every_layer: bool = True
    optimizer_state_offchip: bool = True
    # Shards streamed weights and optimizer state over the replicas (ignored with one replica).
    replicated_tensor_sharding: bool = True
    # float32 matmul partials by default: T5's activations lose precision in float16 partials.
    enable_half_partials: bool = False
    enable_stochastic_rounding: bool = True
    auto_loss_scaling: bool = False
    # Static loss scale for float16; None: 1024.
    loss_scaling: Optional[float] = None
    # None: the number of pipeline stages (pipelined inference needs at least that many), 1 if phased.
    inference_device_iterations: Optional[int] = None
    # Compiled executables are kept here and reused (compiling XXL takes minutes); "" disables.
    # None: <cache>/executables (IPU_T5_CACHE or ~/.cache/ipu_t5).
    executable_cache_dir: Optional[str] = None
    # Reserve the next power of two IPUs when stages x replicas is not one (the extra IPUs idle).
    auto_round_num_ipus: bool = False
    # The compiled graphs pad every prompt to one length: the smallest multiple of 8 holding this
    # share of the data's prompts (1.0: all; 0.999 truncates the longest 0.1% instead of padding
    # every batch to them).
    source_length_coverage: float = 1.0


@dataclass
class OutputConfig:
    """Where results go."""

    # None: runs/<model name>.
    output_dir: Optional[str] = None
    overwrite_output_dir: bool = False
    # A checkpoint every N steps and at the end of training; None: only when stopped by a signal.
    save_steps: Optional[int] = 500
    # Periodic checkpoints kept (the newest ones), besides the best by validation.metric_for_best_model.
    save_total_limit: int = 2
    # "auto": the newest intact checkpoint in output_dir (or start afresh); or a checkpoint path.
    resume_from_checkpoint: Optional[str] = None
    report_to_tensorboard: bool = True


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    ipu: IpuConfig = field(default_factory=IpuConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def output_dir(self) -> Path:
        """The run's output directory, defaulted from the model name."""
        return Path(self.output.output_dir or os.path.join("runs", self.model.name))

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict, as written to YAML and checkpoints."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}

# Spellings users bring from TrainingArguments, IPUConfig or transformers 4.x, mapped to ours.
ALIASES = {
    "layout.layers_per_ipu": "layout.layers_per_stage",
    "layout.ipus_per_replica": "layout.stages",
    "layout.replication_factor": "layout.replicas",
    "training.lr": "training.learning_rate",
    "validation.eval_batch_size": "validation.per_device_eval_batch_size",
    "validation.evaluation_steps": "validation.eval_steps",
    "output.overwrite": "output.overwrite_output_dir",
    "output.metric_for_best_model": "validation.metric_for_best_model",
    # optimum-graphcore's IPUConfig names, written under `ipu:` as its users do.
    "ipu.layers_per_ipu": "layout.layers_per_stage",
    "ipu.ipus_per_replica": "layout.stages",
    "ipu.replication_factor": "layout.replicas",
    "ipu.gradient_accumulation_steps": "layout.gradient_accumulation_steps",
    "task.name": "data.task",
    "peft.rank": "peft.r",
    "peft.alpha": "peft.lora_alpha",
    "peft.dropout": "peft.lora_dropout",
}

CHOICES = {
    "data.source": ("demo", "hub", "files"),
    "training.lr_scheduler_type": ("constant", "linear"),
    "layout.backend": ("auto", "single", "torch", "ipu"),
    "layout.pipeline_schedule": ("GPipe", "1F1B", "Interleaved1F1B"),
    "layout.data_parallel": ("ddp", "fsdp"),
    "ipu.execution_strategy": ("auto", "pipelined", "phased"),
    "peft.method": ("none", "lora"),
}

POSITIVE = {
    "training.max_steps", "training.global_batch_size", "training.logging_steps",
    "validation.per_device_eval_batch_size", "validation.max_new_tokens", "validation.eval_steps",
    "validation.early_stopping_patience",
    "layout.stages", "layout.replicas", "layout.micro_batch_size",
    "layout.gradient_accumulation_steps", "layout.ddp_timeout", "data.max_source_length", "data.max_train_samples",
    "data.max_eval_samples", "data.demo_train_samples", "data.demo_eval_samples",
    "output.save_steps", "output.save_total_limit", "peft.r",
    "ipu.embedding_serialization_factor", "ipu.inference_device_iterations",
}
NON_NEGATIVE = {
    "training.learning_rate", "training.weight_decay", "training.warmup_steps",
    "training.max_grad_norm", "training.adam_epsilon", "data.dataloader_num_workers",
    "validation.early_stopping_threshold",
}


def all_keys() -> List[str]:
    """Every valid `section.key`."""
    return [
        "{}.{}".format(section, f.name)
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    ]


def _suggest(key: str, candidates: List[str]) -> str:
    # A right key in the wrong section beats a near spelling in the right one.
    leaf = key.rsplit(".", 1)[-1]
    close = [c for c in candidates if "." in key and c.rsplit(".", 1)[-1] == leaf]
    close = close or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return " Did you mean '{}'?".format(close[0]) if close else ""


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = getattr(tp, "__origin__", None)
    if origin in (list, List):
        return "a list of " + _type_name(tp.__args__[0]).replace("an ", "").replace("a ", "") + "s"
    if origin in (dict, Dict):
        return "a mapping of names to strings"
    return str(tp)


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check `value` against the field type `tp`; text from the command line is parsed first."""
    origin = getattr(tp, "__origin__", None)
    if origin is Union:
        inner = [a for a in tp.__args__ if a is not type(None)]
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        return _coerce(key, value, inner[0], from_text)
    if from_text and isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads 5e-6 (no dot) as a string: accept any text that is a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, List):
        if isinstance(value, (int, str)) and from_text:
            # "3,3", "3 3" or "q,v": one element per item, each parsed as the element type.
            value = str(value).replace(",", " ").split()
        if isinstance(value, list):
            return [_coerce(key, v, tp.__args__[0], from_text) for v in value]
    elif origin in (dict, Dict):
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: str(v) for k, v in value.items()}
    raise UserError(
        "{} must be {}, got {!r} ({}). Fix it in the config file or with --set {}=VALUE.".format(
            key, _type_name(tp), value, type(value).__name__, key
        )
    )


def _resolve_key(key: str) -> str:
    key = ALIASES.get(key, key)
    if key not in all_keys():
        raise UserError("unknown config key '{}'.{}".format(key, _suggest(key, all_keys())))
    return key


def _set(config: RunConfig, key: str, value: Any, from_text: bool = False) -> None:
    key = _resolve_key(key)
    section, name = key.split(".")
    obj = getattr(config, section)
    tp = get_type_hints(type(obj))[name]
    setattr(obj, name, _coerce(key, value, tp, from_text))


def apply_mapping(config: RunConfig, data: Mapping[str, Any], source: str) -> None:
    """Overlay a nested {section: {key: value}} mapping (a parsed YAML file) onto `config`."""
    if not isinstance(data, Mapping):
        raise UserError("{} must hold a mapping of sections (model, data, training, ...), got {}".format(
            source, type(data).__name__))
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError("unknown config section '{}' in {}.{}".format(
                section, source, _suggest(str(section), list(SECTIONS))))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise UserError("section '{}' in {} must be a mapping of keys to values".format(section, source))
        for name, value in values.items():
            try:
                _set(config, "{}.{}".format(section, name), value)
            except UserError as err:
                raise UserError("{} (in {})".format(err, source)) from None


def apply_overrides(config: RunConfig, overrides: List[str]) -> None:
    """Apply `section.key=value` strings from the command line."""
    for item in overrides:
        if "=" not in item:
            raise UserError("--set needs section.key=value, got '{}' (e.g. --set training.learning_rate=5e-6)".format(item))
        key, value = item.split("=", 1)
        _set(config, key.strip(), value.strip(), from_text=True)


def read_yaml(path: Union[str, Path]) -> Any:
    """Parse a YAML file, turning a missing file or a syntax error into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file '{}' does not exist. Give an existing YAML file, or --model NAME for a preset.".format(path))
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = " at line {}".format(mark.line + 1) if mark is not None else ""
        raise UserError("config file '{}' is not valid YAML{}: {}. Fix the syntax.".format(
            path, where, getattr(err, "problem", err))) from None


def config_dirs() -> List[Path]:
    """Where presets live: the source checkout's configs/, then an installed copy."""
    return [
        Path(__file__).resolve().parent.parent / "configs",
        Path(sys.prefix) / "share" / "ipu-t5" / "configs",
    ]


def preset_path(model_name: str) -> Optional[Path]:
    """The YAML preset of a registered model size, if one is shipped."""
    from .models import canonical_size

    stem = canonical_size(model_name).preset
    for directory in config_dirs():
        candidate = directory / (stem + ".yaml")
        if candidate.is_file():
            return candidate
    return None


def validate(config: RunConfig) -> RunConfig:
    """Check ranges, choices and cross-field rules; the types were checked as values were set."""
    from .models import canonical_size
    from .tasks import build_task

    canonical_size(config.model.name)
    # The task's template, columns, metric and postprocessor are checked here, before any work.
    build_task(config)
    for key in all_keys():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if key in POSITIVE and value is not None and value <= 0:
            raise UserError("{} must be a positive integer, got {}. Give a value of 1 or more.".format(key, value))
        if key in NON_NEGATIVE and value is not None and value < 0:
            raise UserError("{} must not be negative, got {}.".format(key, value))
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError("{} must be one of {}, got '{}'.{}".format(
                key, ", ".join(CHOICES[key]), value, _suggest(str(value), list(CHOICES[key]))))
    if config.model.dropout_rate is not None and not 0.0 <= config.model.dropout_rate < 1.0:
        raise UserError("model.dropout_rate must be in [0, 1), got {}.".format(config.model.dropout_rate))
    if not 0.0 < config.ipu.matmul_proportion <= 1.0:
        raise UserError("ipu.matmul_proportion must be in (0, 1], got {}: it is the share of each IPU's "
                        "memory matmuls may use (optimum-graphcore's default is 0.2).".format(
                            config.ipu.matmul_proportion))
    if config.ipu.loss_scaling is not None and config.ipu.loss_scaling <= 0:
        raise UserError("ipu.loss_scaling must be positive, got {}.".format(config.ipu.loss_scaling))
    if config.training.bf16 and config.training.fp16:
        raise UserError("training.bf16 and training.fp16 are both set: choose one precision.")
    if config.data.source == "files" and not config.data.data_files:
        raise UserError("data.source is 'files' but no data files are given: use --data-files train=PATH,validation=PATH.")
    if not config.peft.lora_alpha > 0:
        raise UserError("peft.lora_alpha must be positive, got {}.".format(config.peft.lora_alpha))
    if not 0.0 <= config.peft.lora_dropout < 1.0:
        raise UserError("peft.lora_dropout must be in [0, 1), got {}.".format(config.peft.lora_dropout))
    if config.peft.method != "none" and not config.peft.target_modules:
        raise UserError("peft.target_modules is empty: name the T5 modules to adapt, e.g. q,v.")
    if not 0.0 < config.ipu.source_length_coverage <= 1.0:
        raise UserError("ipu.source_length_coverage must be in (0, 1], got {}: the share of prompts the IPU's static "
                        "prompt length holds whole.".format(config.ipu.source_length_coverage))
    if config.validation.early_stopping_patience and not (config.validation.do_eval and config.validation.eval_steps):
        raise UserError("validation.early_stopping_patience={} needs validation during training: set "
                        "validation.eval_steps (and keep validation.do_eval=true).".format(
                            config.validation.early_stopping_patience))
    if config.layout.micro_batch_size and config.layout.gradient_accumulation_steps:
        raise UserError(
            "give layout.micro_batch_size or layout.gradient_accumulation_steps, not both: the other "
            "follows from training.global_batch_size ({}).".format(config.training.global_batch_size))
    return config


def load_config(
    model: Optional[str] = None,
    config_file: Optional[Union[str, Path]] = None,
    overrides: Optional[List[str]] = None,
    **values: Any
) -> RunConfig:
    """Build and validate a RunConfig.

    `model` picks a preset by size name, `config_file` overlays a YAML file, `overrides` are
    `section.key=value` strings, and `values` are `section.key` -> value pairs already typed
    (the CLI's dedicated flags), e.g. ``load_config("tiny", **{"training.max_steps": 20})``.
    """
    config = RunConfig()
    file_data = read_yaml(config_file) if config_file else {}
    name = model or ((file_data.get("model") or {}).get("name") if isinstance(file_data, Mapping) else None)
    _set(config, "model.name", name or config.model.name)
    preset = preset_path(config.model.name)
    if preset is not None:
        apply_mapping(config, read_yaml(preset), str(preset))
    if config_file:
        apply_mapping(config, file_data, str(config_file))
    if model:
        config.model.name = model
    apply_overrides(config, overrides or [])
    for key, value in values.items():
        if value is not None:
            _set(config, key, value)
    return validate(config)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (checkpoints, run records)."""
    config = RunConfig()
    apply_mapping(config, data, "saved config")
    return validate(config)
