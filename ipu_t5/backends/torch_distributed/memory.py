"""What each process of the torch backend holds: per-rank byte arithmetic for a layout, in the spirit
of DeepSpeed's `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`, with the pipeline's
activations and this project's start-up, checkpoint and export added.

Pure arithmetic on the layout plan (`ipu_t5.layout`: the same split the trainer uses) and the size
registry (`ipu_t5.models`, activations from `ipu_t5.t5_shapes`): no torch, no torch.distributed, so
`ipu-t5 plan` runs it on both software stacks. Rank r = stage x replicas + replica (topology.py).

Counted per rank, on its device (the GPU, or the host for CPU processes):
- weights: float32 master weights of its stage's blocks (the backend keeps float32 and autocasts to
  bfloat16; the shared embedding only on the embedding's stage, which sends the embedded decoder
  inputs down the pipeline); LoRA adds its adapters, prompt tuning its soft prompt (2 x virtual
  tokens x d_model, on the embedding's stage, whose prompts it lengthens for every encoder part);
  a base quantised by `model.quantization` holds its Linear layers in QUANTISED_BYTES a weight. Under FSDP2 with a unit per block (the default,
  `layout.fsdp_reshard_after_forward`) the shards persist and two units are whole at a time (the one
  computing and the one prefetched); with the chunk one unit, the unsharded parameters persist too
  from the first micro-batch to the end of the step (`torch.distributed.pipelining` defers the
  reduce-scatter), so the step holds both.
- gradients: float32, of what trains (LoRA: the adapters only). Under FSDP2 their shards, and the
  whole gradient of one unit with the reduce-scatter's buffer (a unit per block), or of the whole
  stage with its buffer (one unit).
- optimizer: AdamW's two float32 moments of what this rank holds, divided over the replicas under
  FSDP2.
- activations: one micro-batch's saved forward values of the stage (`t5_shapes.part_activations`),
  times the micro-batches in flight under the schedule (GPipe: all m; 1F1B: min(m, p - s);
  Interleaved1F1B: Megatron's warm-up count of model chunks), plus, under bfloat16 autocast, the
  bfloat16 copies of the weights each micro-batch's backward keeps, plus one more block's values
  for the gradients being computed.
- fixed: what a process holds before any weight (CPU: torch, transformers, tokenizer and data,
  measured; GPU: the CUDA context and communication buffers, an estimate).
- generation: the caches of the micro-batches in flight while validating (`generation_plan`): a whole
  validation batch's (its micro-batches are all in flight), beside the weights and moments.
Peaks: training (all of the above at once, as DeepSpeed and the IPU planner count: it errs high);
checkpoint (weights and moments between steps, the largest tensor twice while it is written and
checksummed); end-of-run export (moments released, the largest tensor twice while written and read
back, and on the main process the reload check's and its predictions' whole float32 model where it
fits); start-up (host memory while weights are read tensor by tensor: on CPU the stage's weights, on
a GPU the largest tensor on its way to the device; one process quantising a base builds it whole in
float32 first, a stage quantises tensor by tensor).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ...checkpointing.export import CHECK_MARGIN
from ...layout import LayoutPlan, plan_from_config
from ...models import ModelSize
from ...t5_shapes import Shapes, block_part, part_activations
from ..precision import cpu_multiplies_bf16
from .generation_plan import cache_bytes, encoder_runs_ahead, run_ahead_bytes, slots, stage_work, utilisation

# Measured with bench/memory.py on this project's 2-core CPU machine (psutil RSS, torch 2.13,
# transformers 5.x): a rank's resident memory before it holds a weight (torch, transformers, the
# tokenizer, the tokenized data, the pipeline's buffers), and torchrun's launcher process (which
# imports neither transformers nor datasets).
PROCESS_BYTES = 450 * 10 ** 6
LAUNCHER_BYTES = 240 * 10 ** 6
# A GPU's memory taken before any tensor: the CUDA context, NCCL's buffers and the caching
# allocator's slack. An estimate (no GPU was measured here), to be re-calibrated on one.
GPU_FIXED_BYTES = 1 * 10 ** 9
# FSDP2's flat communication buffers with the stage one unit, in copies of the stage's float32
# weights (all-gather output) and gradients (reduce-scatter input), on a GPU, whose caching
# allocator keeps them. On CPU processes, whose freed blocks go back to the system at once
# (`host_memory.keep_heap_small`), bench/memory.py's 2x2 ranks peak at the whole stage, its shards
# and moments and the activations (plan/measured 0.96 without buffers, 1.34 with one copy).
FSDP_BUFFERS = {"gpu": 1, "cpu": 0}
# What autograd keeps of a T5 forward over `t5_shapes.part_activations`' count: measured on Hugging
# Face's T5 in float32 (resident memory after the forward, over the count) at 1.20 (base, 8 x 256
# tokens), 1.22 (small, 16 x 128) and 1.03 (base, 4 x 512); their mean.
ACTIVATION_FACTOR = 1.15
# float32 master weights and gradients; AdamW's two float32 moments.
WEIGHT_BYTES = 4
ADAMW_BYTES = 8
# Whole-model copies the main process holds at once at the end of `ipu-t5 train`, above its fixed
# cost: the reload check (one float32 model at a time) and then the reloaded export predicting
# `export.PREDICT_BATCH` prompts at a time (the model, the files' mapped pages and generation's
# tensors). Measured on the 0.99 GB base-shaped model under --stages 4 (psutil every 0.1 s, as
# bench/memory.py samples): rank 0 peaks at 1.56 GB there, 0.45 GB + 1.12 copies (1.99 GB, 1.56
# copies, when the predictions took 64 prompts at a time); one process reloading alone: the check
# +1.06 GB, the predictions +1.12 GB.
RELOAD_COPIES = 1.12

# GPUs the plan always reports on: name -> memory in bytes (nominal; torch reports slightly less).
GPUS = (("A100 40 GB", 40 * 2 ** 30), ("A100 80 GB", 80 * 2 ** 30), ("H100 80 GB", 80 * 2 ** 30))

# Bytes a weight of a quantised Linear takes (`model.quantization`, `ipu_t5.quantization`): nf4 packs two
# 4-bit codes a byte with one float32 scale (absmax) per block of 64 weights; int8 one byte, with
# one float32 scale per output row (under 1% of a byte at Flan-T5's widths, left out).
QUANTISED_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0}

ATTENTION_MODULES = ("q", "k", "v", "o")
FEED_FORWARD_MODULES = ("wi_0", "wi_1", "wo")


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, in bytes, on its device (`fixed` included in the peaks)."""

    rank: int
    stage: int
    replica: int
    blocks: Tuple[str, ...]
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    fixed: int
    checkpoint: int
    export: int
    # Host memory at start-up, while weights are read and placed.
    startup: int
    # CPU processes: the device is the host, and start-up counts towards the peak.
    on_host: bool = True
    # The reload check's whole float32 model in host memory (the main process, where it fits).
    reload_check: int = 0
    # Generation's caches in flight (validation between steps: no gradients, no activations).
    generation: int = 0

    @property
    def training(self) -> int:
        return self.fixed + self.weights + self.gradients + self.optimizer + self.activations

    @property
    def validation(self) -> int:
        return self.fixed + self.weights + self.optimizer + self.generation

    @property
    def peak(self) -> int:
        """The most this rank holds on its device at any time."""
        return max(self.training, self.validation, self.checkpoint, self.export, self.startup if self.on_host else 0)

    @property
    def host_peak(self) -> int:
        """The most this rank's process holds in host memory (its device's peak on CPU processes)."""
        if self.on_host:
            return self.peak
        return max(self.startup, PROCESS_BYTES + self.reload_check)

    def to_dict(self) -> Dict[str, object]:
        return {"rank": self.rank, "stage": self.stage, "replica": self.replica, "blocks": list(self.blocks),
                "params": self.params, "trainable_params": self.trainable, "weights_bytes": self.weights,
                "gradients_bytes": self.gradients, "optimizer_bytes": self.optimizer,
                "activations_bytes": self.activations, "fixed_bytes": self.fixed, "training_bytes": self.training,
                "checkpoint_bytes": self.checkpoint, "export_bytes": self.export,
                "startup_peak_bytes": self.startup, "peak_bytes": self.peak, "host_peak_bytes": self.host_peak,
                "reload_check_bytes": self.reload_check, "generation_cache_bytes": self.generation,
                "validation_bytes": self.validation}


@dataclass(frozen=True)
class MemoryPlan:
    """Every rank of a layout on `device` ("cpu": processes sharing the host; "gpu": one GPU each)."""

    layout: LayoutPlan
    device: str
    activation_bytes: int
    data_parallel: str
    lora: bool
    source_length: int
    target_length: int
    ranks: Tuple[RankMemory, ...]
    # Micro-batches in flight per pipeline while generating, and the share of time a stage then
    # computes on paper (`generation_plan.utilisation`, an encoder pass and `target_length` positions).
    generation_micro_batches: int = 1
    generation_utilisation: float = 1.0
    # model.quantization: none, or the format of the base's Linear weights (QUANTISED_BYTES).
    quantization: str = "none"

    @property
    def largest_process_bytes(self) -> int:
        """The fullest rank's peak on its device."""
        return max(r.peak for r in self.ranks)

    def node_sum_bytes(self, nodes: int = 1) -> int:
        """Host memory of the fullest node's processes at once, the launcher included where there
        is one; each rank counted at its own peak, so this errs high."""
        per_node = len(self.ranks) // nodes
        launcher = LAUNCHER_BYTES if len(self.ranks) > 1 else 0
        return launcher + max(sum(r.host_peak for r in self.ranks[n * per_node:(n + 1) * per_node])
                              for n in range(nodes))

    @property
    def startup_peak_bytes(self) -> int:
        """The most host memory a rank holds while its weights are read."""
        return max(r.startup for r in self.ranks)


def lora_params(size: ModelSize, block: str, r: int, targets) -> int:
    """Parameters of the LoRA adapters peft injects into one plan block (A: r x in, B: out x r)."""
    kind, stack = block_part(block)
    if kind != "block":
        return 0
    d, inner, ff = size.d_model, size.inner_dim, size.d_ff
    shapes = {"q": (d, inner), "k": (d, inner), "v": (d, inner), "o": (inner, d),
              "wi_0": (d, ff), "wi_1": (d, ff), "wo": (ff, d)}
    attentions = 1 if stack == "encoder" else 2
    total = 0
    for name in targets:
        if name in ATTENTION_MODULES:
            total += attentions * r * sum(shapes[name])
        elif name in FEED_FORWARD_MODULES:
            total += r * sum(shapes[name])
    return total


def linear_params(size: ModelSize, block: str) -> int:
    """Weights of one plan block's Linear layers (attention, feed-forward, the LM head): what
    `model.quantization` quantises; the embedding, norms and relative-position biases stay float32."""
    kind, stack = block_part(block)
    if block == "lm_head":
        return size.block_params(block)
    if kind != "block":
        return 0
    attention = 4 * size.d_model * size.inner_dim
    return (1 if stack == "encoder" else 2) * attention + 3 * size.d_model * size.d_ff


def in_flight(layout: LayoutPlan, stage: int) -> float:
    """Micro-batches whose activations a stage holds at once, in whole-stage units (an
    interleaved chunk counts as 1 / chunks_per_stage of its stage)."""
    m, p, s = layout.micro_batches, layout.stages, stage
    if layout.schedule == "GPipe":
        return float(m)
    if p == 1:
        # One stage (and the single backend) runs each micro-batch's backward after its forward.
        return 1.0
    if layout.chunks_per_stage == 1:
        return float(min(m, p - s))
    v = layout.chunks_per_stage
    warmup = min(m * v, 2 * (p - s - 1) + (v - 1) * p + 1)
    return warmup / v


def _activation_bytes(config, device: str) -> int:
    """bfloat16 autocast (2 bytes) where the backend would use it: asked for, or by default on GPUs
    (A100 and H100 have it) and on CPUs that multiply in bfloat16; float32 (4) otherwise."""
    bf16 = config.training.bf16
    if bf16 is None:
        bf16 = device == "gpu" or (device == "cpu" and bool(cpu_multiplies_bf16()))
    return 2 if bf16 else 4


def plan_memory(config, source_length: int, target_length: int, device: str = "cpu",
                layout: Optional[LayoutPlan] = None, host_bytes: Optional[int] = None) -> MemoryPlan:
    """The per-rank memory of `config`'s layout (`layout`: the trainer's own plan, else the plan
    for these lengths) on `device`; `host_bytes`: the main process's memory, where the export's
    reload check runs only if the whole model fits CHECK_MARGIN times (export.py's rule) (None: it fits)."""
    layout = layout or plan_from_config(config, source_length, target_length)
    size, replicas = layout.size, layout.replicas
    fsdp = config.layout.data_parallel == "fsdp" and replicas > 1
    lora = config.peft.method == "lora"
    quantisation = config.model.quantization
    # One process builds the whole model (a quantised base through a float copy); the torch backend
    # builds stage by stage.
    whole_build = layout.world_size == 1 and config.layout.backend != "torch"
    # Only adapters train (LoRA's, or the soft prompt, whose virtual tokens every encoder part sees).
    adapters_only = config.peft.method != "none"
    prompt_rows = 2 * config.peft.num_virtual_tokens if config.peft.method == "prompt_tuning" else 0
    act = _activation_bytes(config, device)
    shapes = Shapes(layout.micro_batch_size, source_length + prompt_rows // 2, target_length, act)
    embedding = size.block_params("embedding")
    largest_tensor = WEIGHT_BYTES * max(embedding, size.d_model * size.d_ff)
    # LoRA's adapters by block (the embedding, the head and the norms have none).
    adapters_of = {b: lora_params(size, b, config.peft.r, config.peft.target_modules) if lora else 0
                   for b in size.block_names}
    adapters_of["embedding"] = adapters_of.get("embedding", 0) + prompt_rows * size.d_model
    total = size.total_params() + sum(adapters_of.values())
    # The reload check (ipu_t5/checkpointing/export.py) loads the whole export in float32 on the
    # main process where it fits; `ipu-t5 train` frees every process's model before it, so it
    # takes the stage's place, not a place on top of it.
    main_reloads = config.validation.do_eval
    reload_fits = host_bytes is None or WEIGHT_BYTES * total * CHECK_MARGIN <= host_bytes
    ranks: List[RankMemory] = []
    generating = slots(config.validation.generation_micro_batches, layout.stages)
    for stage in range(layout.stages):
        chunks = layout.chunks_of(stage)
        blocks = tuple(b for c in chunks for b in layout.stage_blocks[c])
        adapters = sum(adapters_of.get(b, 0) for b in blocks)
        held = layout.stage_params(stage) + adapters
        # The bytes of those weights as held: a quantised base's Linear layers in QUANTISED_BYTES each.
        quantised = sum(linear_params(size, b) for b in blocks) if quantisation != "none" else 0
        held_bytes = int(WEIGHT_BYTES * held - (WEIGHT_BYTES - QUANTISED_BYTES.get(quantisation, 4)) * quantised)
        trainable = adapters if adapters_only else held
        one = ACTIVATION_FACTOR * sum(part_activations(size, *block_part(b), shapes=shapes) for b in blocks)
        largest_part = ACTIVATION_FACTOR * max(part_activations(size, *block_part(b), shapes=shapes) for b in blocks)
        # bitsandbytes dequantises a quantised weight as it computes and keeps no copy for the backward.
        autocast_copies = 2 * (held - quantised) if act == 2 else 0
        activations = int(in_flight(layout, stage) * (one + autocast_copies) + largest_part)
        if fsdp and config.layout.fsdp_reshard_after_forward:
            # A unit per block: the shards, and the unit being computed gathered beside the next one
            # (FSDP2 prefetches); its whole gradient and the reduce-scatter's buffer.
            unit = max(size.block_params(b) + adapters_of.get(b, 0) for b in blocks)
            weights = WEIGHT_BYTES * (held // replicas + 2 * unit)
            gradients = WEIGHT_BYTES * (trainable // replicas + 2 * (unit if trainable else 0))
        else:
            # FSDP2 with the chunk one unit: the shards beside the whole stage, and its buffers.
            buffers = FSDP_BUFFERS[device]
            weights = held_bytes + (WEIGHT_BYTES * held // replicas + buffers * WEIGHT_BYTES * held
                                    if fsdp else 0)
            gradients = WEIGHT_BYTES * trainable + (WEIGHT_BYTES * trainable // replicas
                                                    + buffers * WEIGHT_BYTES * trainable if fsdp else 0)
        optimizer = ADAMW_BYTES * trainable // (replicas if fsdp else 1)
        resting = held_bytes // (replicas if fsdp else 1)
        fixed = PROCESS_BYTES if device == "cpu" else GPU_FIXED_BYTES
        checkpoint = fixed + resting + optimizer + 2 * largest_tensor
        # Host memory while the weights are read: a CPU rank materialises its stage (under FSDP2 the
        # whole chunk before it is sharded); a GPU rank stages one tensor at a time.
        startup = PROCESS_BYTES + (WEIGHT_BYTES * held + (WEIGHT_BYTES * held // replicas if fsdp else 0)
                                   if device == "cpu" else largest_tensor)
        caches = cache_bytes(size, blocks, config.validation.per_device_eval_batch_size, source_length, target_length,
                             act) if config.validation.do_eval else 0
        if config.validation.do_eval and stage == 0 and encoder_runs_ahead(layout):
            micro_rows = -(-config.validation.per_device_eval_batch_size // generating)
            caches += run_ahead_bytes(size, blocks, micro_rows, source_length)
        if quantised and whole_build:
            # The float base is built on the host, then loaded back quantised (`quantization.load_quantised`).
            startup = PROCESS_BYTES + WEIGHT_BYTES * held + held_bytes
        elif quantised:
            # A stage quantises each weight as it is read (`quantization.quantised_weight`): on a CPU
            # the quantised stage and one float tensor on its way.
            startup = PROCESS_BYTES + largest_tensor + (held_bytes if device == "cpu" else 0)
        for replica in range(replicas):
            rank = stage * replicas + replica
            reload = int(RELOAD_COPIES * WEIGHT_BYTES * total) if main_reloads and rank == 0 and reload_fits else 0
            # A quantised base's export is float: the merged weights, dequantised, beside the model.
            writing = resting + 2 * largest_tensor + (WEIGHT_BYTES * held if quantised else 0)
            on_device = reload if device == "cpu" else 0
            export = fixed + max(writing, on_device)
            ranks.append(RankMemory(rank=rank, stage=stage, replica=replica, blocks=blocks, params=held,
                                    trainable=trainable, weights=weights, gradients=gradients, optimizer=optimizer,
                                    activations=activations, fixed=fixed, checkpoint=checkpoint, export=export,
                                    startup=startup, on_host=device == "cpu", reload_check=reload, generation=caches))
    return MemoryPlan(layout=layout, device=device, activation_bytes=act, data_parallel=config.layout.data_parallel,
                      lora=adapters_only, source_length=source_length, target_length=target_length, ranks=tuple(ranks),
                      generation_micro_batches=generating,
                      generation_utilisation=utilisation(layout.stages, generating, target_length + 1,
                                                               stage_work(size, layout, source_length, target_length)),
                      quantization=quantisation)


def lightest_cut(config, source_length: int, target_length: int, device: str = "cpu", size=None) -> LayoutPlan:
    """The torch backend's default cut: of the compute-balanced cut, the memory-balanced one (the
    fastest within 5% of the least training state) and the one with the least training state
    however slow, the one whose fullest rank this plan puts lowest (on a tie, the faster, in that
    order). Evening out weights, gradients and moments is not always lighter: a long-prompt 1F1B
    pipeline keeps the most micro-batches in flight on its first stages, whose encoder blocks carry
    the largest activations, so XXL on 16 GPUs at 512-token prompts peaks higher cut by memory than
    cut by compute, while a flan-t5-base-shaped model on 4 CPU processes peaks lower cut by memory.
    `layout.layers_per_stage` is taken as given. `size`: the architecture (`plan_from_config`'s)."""
    from ...models import model_size

    size = size or model_size(config)
    by_memory = plan_from_config(config, source_length, target_length, split_by="memory", size=size)
    if config.layout.layers_per_stage is not None or by_memory.stages == 1:
        return by_memory
    cuts = [plan_from_config(config, source_length, target_length, split_by="compute", size=size), by_memory,
            plan_from_config(config, source_length, target_length, split_by="state", size=size)]
    return min(cuts, key=lambda cut: plan_memory(config, source_length, target_length, device,
                                                  cut).largest_process_bytes)


def gpu_fits(config, source_length: int, target_length: int, layout: Optional[LayoutPlan] = None
             ) -> List[Tuple[str, int, bool]]:
    """(GPU, its memory, whether every rank's peak fits one) for the GPUs in GPUS (`layout`: else
    the cut the backend would take on GPUs)."""
    layout = layout or lightest_cut(config, source_length, target_length, "gpu")
    plan = plan_memory(config, source_length, target_length, "gpu", layout)
    return [(name, memory, plan.largest_process_bytes <= memory) for name, memory in GPUS]
