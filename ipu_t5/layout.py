"""The layout plan: how one training step is split over stages, replicas and micro-batches.

Pure arithmetic on the config and the model size, no torch: the same plan drives the single
process, the torch.distributed pipeline and the IPU backend, and `ipu-t5 plan` prints it without
weights or hardware.

- world size = stages x replicas
- global batch = micro-batch size x micro-batches (gradient accumulation) x replicas
- encoder and decoder blocks are cut into contiguous model chunks, one per stage (two per stage
  under the interleaved schedule, chunk c running on stage c % stages), balanced by compute
  unless `layers_per_stage` gives the counts; the shared embedding sits on the first chunk, the
  LM head on the last, each final layer norm with the last block of its stack.
- the default cut (`split_by`): "memory" evens out each stage's share of the training state
  (weights, gradients, AdamW moments), which decides whether a layout fits at all, and among the
  cuts within `MEMORY_SLACK` of the best it takes the fastest; "state" is the cut with the least
  largest share, however slow (the torch backend weighs it too); "compute" evens out forward FLOPs
  alone (the IPU planner's own starting point, which also weighs a parameter-balanced cut).
  Balancing compute alone puts Flan-T5's whole decoder and LM head on the last of 4 stages on
  MNLI-shaped data (targets of a few tokens make decoder blocks cheap): 56% of the weights.
"""
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .errors import UserError
from .models import ModelSize


# Model chunks per stage under the interleaved schedule (Megatron's virtual pipeline stages).
INTERLEAVED_CHUNKS = 2
# A memory-balanced cut may hold this much more than the best one (relative) to be faster.
MEMORY_SLACK = 0.05
# Training state per parameter, in weight-sized words: the weight, its gradient and AdamW's two
# moments.
STATE_WORDS = 4


@dataclass(frozen=True)
class LayoutPlan:
    """A validated split of the model and of the global batch."""

    size: ModelSize
    stages: int
    replicas: int
    micro_batch_size: int
    micro_batches: int
    # Block names per model chunk, in pipeline order; "embedding" first on chunk 0, "lm_head" last.
    # Chunk c runs on stage c % stages, so with one chunk per stage this is one entry per stage.
    stage_blocks: Tuple[Tuple[str, ...], ...]
    schedule: str = "1F1B"
    chunks_per_stage: int = 1
    # What chose `stage_blocks`: "memory", "state" or "compute" (the default cuts, the module's
    # docstring), or "given" (layers_per_stage).
    split_by: str = "memory"

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.replicas

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def stage_of(self, block: str) -> int:
        """The stage that owns a block (`encoder.3`, `embedding`, `lm_head`, ...)."""
        for index, blocks in enumerate(self.stage_blocks):
            if block in blocks:
                return index % self.stages
        raise KeyError(block)

    def chunks_of(self, stage: int) -> List[int]:
        """The model chunks (indices into `stage_blocks`) that run on `stage`, in pipeline order."""
        return list(range(stage, len(self.stage_blocks), self.stages))

    def stage_params(self, index: int) -> int:
        return sum(self.size.block_params(b) for c in self.chunks_of(index) for b in self.stage_blocks[c])

    def stage_flops(self, index: int, source_len: int, target_len: int) -> float:
        return sum(self.size.block_flops(b, source_len, target_len)
                   for c in self.chunks_of(index) for b in self.stage_blocks[c])

    def balance(self, source_len: int, target_len: int) -> float:
        """Slowest stage over the mean stage, by forward FLOPs (1.0 is perfect)."""
        costs = [self.stage_flops(i, source_len, target_len) for i in range(self.stages)]
        return max(costs) / (sum(costs) / len(costs))

    def bubble_fraction(self) -> float:
        """The idle fraction of a synchronous pipeline: (p - 1) / (m + p - 1)."""
        return (self.stages - 1) / (self.micro_batches + self.stages - 1)

    def split(self, samples: Sequence[Any]) -> List[List[List[Any]]]:
        """A global batch as [replica][micro-batch] lists of samples, in order."""
        if len(samples) != self.global_batch_size:
            raise ValueError("a step needs {} samples, got {}".format(self.global_batch_size, len(samples)))
        per_replica = self.micro_batch_size * self.micro_batches
        return [
            [list(samples[r * per_replica + m * self.micro_batch_size:
                          r * per_replica + (m + 1) * self.micro_batch_size])
             for m in range(self.micro_batches)]
            for r in range(self.replicas)
        ]

    def check_world_size(self, launched: int) -> None:
        """Refuse a launch whose process count does not match the plan."""
        if launched != self.world_size:
            raise UserError(
                "the layout needs stages x replicas = {} x {} = {} processes but {} were launched: "
                "launch {} (run.sh does this) or change --stages/--replicas.".format(
                    self.stages, self.replicas, self.world_size, launched, self.world_size))

    def describe(self) -> str:
        """The lines printed at start: the split of the batch and of the model."""
        lines = [
            "layout: {} stage(s) x {} replica(s) = {} process(es); global batch {} = micro-batch {} "
            "x {} micro-batch(es) x {} replica(s)".format(
                self.stages, self.replicas, self.world_size, self.global_batch_size,
                self.micro_batch_size, self.micro_batches, self.replicas)
        ]
        if self.stages > 1:
            for index, blocks in enumerate(self.stage_blocks):
                chunk = " (chunk {})".format(index) if self.chunks_per_stage > 1 else ""
                lines.append("  stage {}{}: {}".format(index % self.stages, chunk, compact_blocks(blocks)))
        return "\n".join(lines)


def compact_blocks(blocks: Sequence[str]) -> str:
    """`encoder.0 .. encoder.5, decoder.0` style summary of a stage's blocks."""
    runs: List[List[str]] = []
    for block in blocks:
        if runs and "." in block and "." in runs[-1][-1] and block.split(".")[0] == runs[-1][-1].split(".")[0]:
            runs[-1].append(block)
        else:
            runs.append([block])
    return ", ".join(r[0] if len(r) == 1 else "{} .. {}".format(r[0], r[-1]) for r in runs)


def pipeline_accumulation_needed(stages: int) -> int:
    """Micro-batches a training pipeline over `stages` stages needs at least: as many as its
    forward and backward stages (poptorch requires it on IPUs; it keeps the torch schedules'
    bubble small)."""
    return 2 * stages - 1 if stages > 1 else 1


def _split_batch(global_batch: int, replicas: int, stages: int, micro_batch_size: Optional[int],
                 accumulation: Optional[int]) -> Tuple[int, int]:
    if global_batch % replicas:
        raise UserError("global batch {} does not split over {} replicas: choose a global batch that "
                        "is a multiple of {}.".format(global_batch, replicas, replicas))
    per_replica = global_batch // replicas
    if micro_batch_size is not None:
        if per_replica % micro_batch_size:
            raise UserError("each replica's share of the global batch ({} / {} = {}) is not a multiple of "
                            "micro_batch_size {}.".format(global_batch, replicas, per_replica, micro_batch_size))
        return micro_batch_size, per_replica // micro_batch_size
    if accumulation is not None:
        if per_replica % accumulation:
            raise UserError("each replica's share of the global batch ({} / {} = {}) does not split into "
                            "{} micro-batches.".format(global_batch, replicas, per_replica, accumulation))
        return per_replica // accumulation, accumulation
    if stages == 1:
        return per_replica, 1
    # The fewest micro-batches a pipeline needs that divide the replica's batch evenly.
    for count in range(pipeline_accumulation_needed(stages), per_replica + 1):
        if per_replica % count == 0:
            return per_replica // count, count
    return 1, per_replica


def partition_costs(costs: Sequence[float], parts: int) -> List[int]:
    """Counts of a contiguous partition of `costs` into `parts` non-empty runs that minimises the
    costliest run (exact dynamic programme; 48 blocks x 16 stages is instant)."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    return partition_runs(lambda j, i: prefix[i] - prefix[j], len(costs), parts)


def partition_runs(run_cost: Callable[[int, int], float], n: int, parts: int) -> List[int]:
    """Counts of a contiguous partition of items 0..n-1 into `parts` non-empty runs that minimises
    the largest `run_cost(start, end)` (end exclusive; any cost, not only sums)."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], run_cost(j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


def best_balance(costs: Sequence[float], parts: int) -> float:
    """Slowest over mean part of the best contiguous split of `costs` into `parts` runs: the
    lower bound on `LayoutPlan.balance` at the granularity `costs` are given in."""
    counts, start, totals = partition_costs(costs, parts), 0, []
    for count in counts:
        totals.append(sum(costs[start:start + count]))
        start += count
    return max(totals) / (sum(totals) / parts)


def _stage_blocks(size: ModelSize, counts: Sequence[int]) -> Tuple[Tuple[str, ...], ...]:
    names = size.block_names
    stages, start = [], 0
    for count in counts:
        stages.append(list(names[start:start + count]))
        start += count
    last_encoder = "encoder.{}".format(size.num_layers - 1)
    for blocks in stages:
        if last_encoder in blocks:
            blocks.insert(blocks.index(last_encoder) + 1, "encoder.final_layer_norm")
    stages[0].insert(0, "embedding")
    stages[-1].extend(["decoder.final_layer_norm", "lm_head"])
    return tuple(tuple(b) for b in stages)


def stage_costs(size: ModelSize, source_len: int, target_len: int) -> List[float]:
    """Per-block forward FLOPs in pipeline order, with the embedding and LM head folded into the
    first and last blocks (they always sit there)."""
    costs = [size.block_flops(b, source_len, target_len) for b in size.block_names]
    costs[0] += size.block_flops("embedding", source_len, target_len)
    costs[-1] += size.block_flops("lm_head", source_len, target_len)
    return costs


def state_costs(size: ModelSize) -> List[float]:
    """Per-block training state in weight-sized words, in pipeline order, with the embedding and
    LM head folded into the first and last blocks."""
    costs = [float(STATE_WORDS * size.block_params(b)) for b in size.block_names]
    costs[0] += STATE_WORDS * size.block_params("embedding")
    costs[-1] += STATE_WORDS * size.block_params("lm_head")
    return costs


def memory_balanced_counts(size: ModelSize, chunks: int, source_len: int, target_len: int,
                           slack: float = MEMORY_SLACK) -> List[int]:
    """Blocks per chunk: the smallest largest share of the training state any contiguous cut
    reaches, then, among the cuts within `slack` of it, the one whose slowest chunk is fastest."""
    state, flops = state_costs(size), stage_costs(size, source_len, target_len)
    state_prefix, flops_prefix = [0.0], [0.0]
    for a, b in zip(state, flops):
        state_prefix.append(state_prefix[-1] + a)
        flops_prefix.append(flops_prefix[-1] + b)

    def run_state(j: int, i: int) -> float:
        return state_prefix[i] - state_prefix[j]

    n = len(state)
    counts = partition_runs(run_state, n, chunks)
    starts = [sum(counts[:k]) for k in range(chunks)]
    limit = max(run_state(a, a + c) for a, c in zip(starts, counts)) * (1.0 + slack)
    return partition_runs(lambda j, i: flops_prefix[i] - flops_prefix[j] if run_state(j, i) <= limit
                          else float("inf"), n, chunks)


def plan_layout(
    size: ModelSize,
    global_batch_size: int,
    stages: int = 1,
    replicas: int = 1,
    micro_batch_size: Optional[int] = None,
    gradient_accumulation_steps: Optional[int] = None,
    layers_per_stage: Optional[Sequence[int]] = None,
    schedule: str = "1F1B",
    source_len: int = 128,
    target_len: int = 4,
    pipelined: bool = True,
    split_by: str = "memory",
) -> LayoutPlan:
    """Validate and build a plan; every refusal names the numbers that do not fit. Without
    `layers_per_stage` the blocks are cut as `split_by` says (the module's docstring). `pipelined`
    False: the stages are IPUs that each compute a share of every phase (phased IPU execution),
    not a pipeline to fill, so any number of micro-batches will do."""
    blocks = len(size.block_names)
    chunks_per_stage = INTERLEAVED_CHUNKS if schedule == "Interleaved1F1B" else 1
    chunks = stages * chunks_per_stage
    if chunks_per_stage > 1 and stages < 2:
        raise UserError("the {} schedule interleaves {} model chunks per stage over several stages, but "
                        "the layout has 1 stage: use --stages 2 or more, or pipeline_schedule 1F1B."
                        .format(schedule, chunks_per_stage))
    if stages > blocks:
        raise UserError("{} stages for a model of {} blocks ({} encoder + {} decoder): every stage needs "
                        "at least one block, so use at most {} stages.".format(
                            stages, blocks, size.num_layers, size.num_decoder_layers, blocks))
    if chunks > blocks:
        raise UserError("{} stages x {} interleaved chunks = {} chunks for a model of {} blocks: every chunk "
                        "needs at least one block, so use at most {} stages with {}.".format(
                            stages, chunks_per_stage, chunks, blocks, blocks // chunks_per_stage, schedule))
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != chunks:
            where = "there are {} stages: give one count per stage".format(stages) if chunks_per_stage == 1 else \
                "{} runs {} stages x {} = {} model chunks: give one count per chunk".format(
                    schedule, stages, chunks_per_stage, chunks)
            raise UserError("layers_per_stage {} has {} entries but {}.".format(counts, len(counts), where))
        if any(c < 1 for c in counts):
            raise UserError("layers_per_stage {} leaves a stage with no block: every count must be at "
                            "least 1.".format(counts))
        if sum(counts) != blocks:
            raise UserError("layers_per_stage {} sums to {} but the model has {} blocks ({} encoder + {} "
                            "decoder).".format(counts, sum(counts), blocks, size.num_layers, size.num_decoder_layers))
        split_by = "given"
    elif split_by == "compute":
        counts = partition_costs(stage_costs(size, source_len, target_len), chunks)
    elif split_by == "state":
        counts = memory_balanced_counts(size, chunks, source_len, target_len, slack=0.0)
    else:
        counts = memory_balanced_counts(size, chunks, source_len, target_len)
    micro, accumulation = _split_batch(global_batch_size, replicas, stages, micro_batch_size,
                                       gradient_accumulation_steps)
    if pipelined and stages > 1 and accumulation < stages:
        raise UserError("a {}-stage pipeline needs at least {} micro-batches per step, but global batch "
                        "{} over {} replica(s) gives {}: raise the global batch or lower micro_batch_size "
                        "(on IPUs, ipu.execution_strategy=phased has no such rule).".format(
                            stages, stages, global_batch_size, replicas, accumulation))
    rounds = max(1, accumulation // stages)
    if chunks_per_stage > 1 and accumulation % rounds:
        raise UserError("{} runs micro-batches in rounds of {} stages: {} micro-batches per step is not a "
                        "multiple of {} rounds. Use a multiple of {} micro-batches.".format(
                            schedule, stages, accumulation, rounds, stages))
    return LayoutPlan(size=size, stages=stages, replicas=replicas, micro_batch_size=micro,
                      micro_batches=accumulation, stage_blocks=_stage_blocks(size, counts), schedule=schedule,
                      chunks_per_stage=chunks_per_stage, split_by=split_by)


def plan_from_config(config, source_len: int = 128, target_len: int = 4, split_by: str = "memory",
                     size=None) -> LayoutPlan:
    """The plan for a RunConfig, given the data's token lengths; `split_by` is the backend's
    (`Backend.split_by`); `size` the architecture the run builds (default `models.model_size`: the
    weights' own config.json, else the registry's `model.name`). Phased IPU execution
    (`ipu.execution_strategy=phased`) is no pipeline: it keeps no minimum of micro-batches."""
    from .models import model_size

    layout = config.layout
    return plan_layout(
        size or model_size(config), config.training.global_batch_size, layout.stages,
        layout.replicas, layout.micro_batch_size, layout.gradient_accumulation_steps,
        layout.layers_per_stage, layout.pipeline_schedule, source_len, target_len, split_by=split_by,
        pipelined=not phased_only(config),
    )


def phased_only(config) -> bool:
    """Whether the run can only be phased IPU execution (the layout's stages are no pipeline)."""
    return config.layout.backend in ("ipu", "auto") and config.ipu.execution_strategy == "phased"


def check_pipeline_fill(plan: LayoutPlan) -> None:
    """A pipeline's rule, for backends that run one: at least one micro-batch per stage."""
    if plan.stages > 1 and plan.micro_batches < plan.stages:
        raise UserError("a {}-stage pipeline needs at least {} micro-batches per step, but the layout gives {} "
                        "(ipu.execution_strategy=phased allows fewer on IPUs only): raise the global batch or "
                        "lower micro_batch_size.".format(plan.stages, plan.stages, plan.micro_batches))
