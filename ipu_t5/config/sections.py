"""The typed run configuration: one dataclass per section, each key named as in Hugging Face's
TrainingArguments or optimum-graphcore's IPUConfig where a name exists.

Everything the user can set lives here and is checked once, when the config is built
(`ipu_t5.config.loading` and `ipu_t5.config.validation`). The rest of the package trusts a
`RunConfig` and never re-validates it.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

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
    # int8 | nf4: the frozen base weights quantised by bitsandbytes (BitsAndBytesConfig) under LoRA;
    # none: float32.
    quantization: str = "none"


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
    # None: bfloat16 autocast where the device multiplies in it (GPUs with bfloat16, CPUs with
    # AVX512-BF16 or AMX), float32 elsewhere; weights, optimizer state and the loss stay float32.
    bf16: Optional[bool] = None
    # float16 is the IPU's training precision (None: float16 on the IPU, off elsewhere, where T5
    # overflows in it).
    fp16: Optional[bool] = None
    logging_steps: int = 10
    # Steps in a row whose loss or gradient norm is not finite (each skipped, the weights left as
    # they were) before the run stops; docs/configuration.md says why 20.
    max_nonfinite_steps: int = 20
    # The largest micro-batch the memory plan fits on this machine, picked before any weight is read,
    # the global batch kept by gradient accumulation (single and torch backends; the IPU's planner
    # picks its own). Hugging Face's name; it retries after out-of-memory errors instead.
    auto_find_batch_size: bool = False
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
    # A local evaluate module under ipu_t5/tasks/metrics (rouge, exact_match) or a directory holding one.
    metric: Optional[str] = None
    # How generated text becomes a prediction: strip | lower.
    postprocess: Optional[str] = None


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning through `peft`, named as in its LoraConfig and
    PromptTuningConfig."""

    # none: every weight trains; lora: only low-rank adapters on `target_modules` train;
    # prompt_tuning: only a soft prompt of `num_virtual_tokens` in front of the encoder input trains.
    method: str = "none"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # T5's attention projections are q, k, v, o; its feed-forward wi_0, wi_1, wo.
    target_modules: List[str] = field(default_factory=lambda: ["q", "v"])
    # Soft prompts (peft.method=prompt_tuning): virtual tokens, started from the normal(0, 1) draws of
    # peft's nn.Embedding (random) or from the word embeddings of `prompt_tuning_init_text` (text).
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "random"
    prompt_tuning_init_text: Optional[str] = None


@dataclass
class ValidationConfig:
    """Generation-based validation."""

    do_eval: bool = True
    per_device_eval_batch_size: int = 64
    # None: the longest tokenized target plus its end-of-sequence token.
    max_new_tokens: Optional[int] = None
    # Validate every N training steps as well as at the end; None: only at the end.
    eval_steps: Optional[int] = None
    # Generation under bfloat16 autocast (true) or in float32 (false); None: as training computes.
    bf16: Optional[bool] = None
    # The validation result that ranks evaluations (`trainer.best_metric`) and keeps the best
    # checkpoint; None: the task's lead score (accuracy for MNLI, rougeL for summarization, ...).
    metric_for_best_model: Optional[str] = None
    # None: greater is better unless the metric is a loss (Hugging Face's rule).
    greater_is_better: Optional[bool] = None
    # Micro-batches in flight in each pipeline while it generates (torch backend, --stages > 1): at
    # least the stages; None: twice the stages.
    generation_micro_batches: Optional[int] = None
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
    # FSDP2 under a pipeline schedule: true gathers each block's weights for its forward and again for
    # its backward, and reduce-scatters its gradients after every micro-batch (only one block is ever
    # whole); false keeps the stage's weights and gradients whole from the first micro-batch to the
    # step's end (one reduce-scatter a step, more memory). FSDP2's own name (torchtitan's setting).
    fsdp_reshard_after_forward: bool = True
    # Seconds a torch.distributed collective may wait before the run fails instead of hanging.
    ddp_timeout: int = 1800
    # Refuse, before any weight is read, a single or torch.distributed layout whose memory plan
    # (`ipu-t5 plan --backend torch`) exceeds the GPUs' or the host's memory; false tries anyway.
    check_memory: bool = True


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
    # Write periodic checkpoints beside the next steps, from a copy in host memory (one more copy
    # of each process's weights and optimizer state while a write is in flight).
    async_save: bool = False


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


def all_keys() -> List[str]:
    """Every valid `section.key`."""
    return [
        "{}.{}".format(section, f.name)
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    ]
