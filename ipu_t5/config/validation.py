"""Ranges, choices and cross-field rules of a RunConfig, checked once when it is built."""
import difflib
from typing import List

from ..errors import UserError
from .sections import RunConfig, all_keys

CHOICES = {
    "data.source": ("demo", "hub", "files"),
    "training.lr_scheduler_type": ("constant", "linear"),
    "layout.backend": ("auto", "single", "torch", "ipu"),
    "layout.pipeline_schedule": ("GPipe", "1F1B", "Interleaved1F1B"),
    "layout.data_parallel": ("ddp", "fsdp"),
    "ipu.execution_strategy": ("auto", "pipelined", "phased"),
    "peft.method": ("none", "lora", "prompt_tuning"),
    "peft.prompt_tuning_init": ("random", "text"),
    "model.quantization": ("none", "int8", "nf4"),
}

POSITIVE = {
    "training.max_steps", "training.global_batch_size", "training.logging_steps", "training.max_nonfinite_steps",
    "validation.per_device_eval_batch_size", "validation.max_new_tokens", "validation.eval_steps",
    "validation.early_stopping_patience", "validation.generation_micro_batches",
    "layout.stages", "layout.replicas", "layout.micro_batch_size",
    "layout.gradient_accumulation_steps", "layout.ddp_timeout", "data.max_source_length", "data.max_train_samples",
    "data.max_eval_samples", "data.demo_train_samples", "data.demo_eval_samples",
    "output.save_steps", "output.save_total_limit", "peft.r", "peft.num_virtual_tokens",
    "ipu.embedding_serialization_factor", "ipu.inference_device_iterations",
}
NON_NEGATIVE = {
    "training.learning_rate", "training.weight_decay", "training.warmup_steps",
    "training.max_grad_norm", "training.adam_epsilon", "data.dataloader_num_workers",
    "validation.early_stopping_threshold",
}


def suggest(key: str, candidates: List[str]) -> str:
    """A " Did you mean ...?" hint naming the closest of `candidates`, or nothing."""
    # A right key in the wrong section beats a near spelling in the right one.
    leaf = key.rsplit(".", 1)[-1]
    close = [c for c in candidates if "." in key and c.rsplit(".", 1)[-1] == leaf]
    close = close or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return " Did you mean '{}'?".format(close[0]) if close else ""


def validate(config: RunConfig) -> RunConfig:
    """Check ranges, choices and cross-field rules; the types were checked as values were set."""
    from ..models import canonical_size
    from ..tasks import build_task

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
                key, ", ".join(CHOICES[key]), value, suggest(str(value), list(CHOICES[key]))))
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
    if config.validation.bf16 and config.training.fp16:
        raise UserError("validation.bf16 and training.fp16 are both set: a float16 (IPU) run validates in float16; "
                        "unset validation.bf16.")
    if config.data.source == "files" and not config.data.data_files:
        raise UserError("data.source is 'files' but no data files are given: use --data-files train=PATH,validation=PATH.")
    if not config.peft.lora_alpha > 0:
        raise UserError("peft.lora_alpha must be positive, got {}.".format(config.peft.lora_alpha))
    if not 0.0 <= config.peft.lora_dropout < 1.0:
        raise UserError("peft.lora_dropout must be in [0, 1), got {}.".format(config.peft.lora_dropout))
    if config.peft.method == "prompt_tuning" and config.peft.prompt_tuning_init == "text" and \
            not config.peft.prompt_tuning_init_text:
        raise UserError("peft.prompt_tuning_init=text needs peft.prompt_tuning_init_text: the text whose word "
                        "embeddings the soft prompt starts from.")
    if config.model.quantization != "none" and config.peft.method != "lora":
        raise UserError("model.quantization={} freezes the base in {}: train LoRA adapters on it (--peft lora), "
                        "or set model.quantization=none.".format(config.model.quantization,
                                                                 config.model.quantization))
    if config.peft.method == "lora" and not config.peft.target_modules:
        raise UserError("peft.target_modules is empty: name the T5 modules to adapt, e.g. q,v.")
    if not 0.0 < config.ipu.source_length_coverage <= 1.0:
        raise UserError("ipu.source_length_coverage must be in (0, 1], got {}: the share of prompts the IPU's static "
                        "prompt length holds whole.".format(config.ipu.source_length_coverage))
    if config.validation.early_stopping_patience and not (config.validation.do_eval and config.validation.eval_steps):
        raise UserError("validation.early_stopping_patience={} needs validation during training: set "
                        "validation.eval_steps (and keep validation.do_eval=true).".format(
                            config.validation.early_stopping_patience))
    in_flight = config.validation.generation_micro_batches
    if in_flight is not None and in_flight < config.layout.stages:
        raise UserError("validation.generation_micro_batches={} is fewer than the {} stages: a stage would wait for "
                        "work at every position; give at least {} (or leave it unset: twice the stages).".format(
                            in_flight, config.layout.stages, config.layout.stages))
    if config.training.auto_find_batch_size and (config.layout.micro_batch_size or
                                                 config.layout.gradient_accumulation_steps):
        raise UserError("training.auto_find_batch_size picks the micro-batch itself: drop layout.micro_batch_size "
                        "and layout.gradient_accumulation_steps, or set training.auto_find_batch_size=false.")
    if config.layout.micro_batch_size and config.layout.gradient_accumulation_steps:
        raise UserError(
            "give layout.micro_batch_size or layout.gradient_accumulation_steps, not both: the other "
            "follows from training.global_batch_size ({}).".format(config.training.global_batch_size))
    return config
