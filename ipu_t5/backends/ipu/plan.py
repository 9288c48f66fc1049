"""The layout plan mapped onto Graphcore IPUs: execution strategy, pieces per IPU, memory, and the
rules poptorch enforces at compile time, checked here first so nobody waits for a compile to
learn them.

- IPUs per replica = the plan's stages (stage i is IPU i), replicas = poptorch's replication
  factor, micro-batches = gradient accumulation. Training runs one device iteration per call (the
  trainer sets the learning rate and logs every step) and asks for the loss summed over the
  micro-batches (`OutputMode.Sum`); inference returns every output (`OutputMode.All`).
- Rules: IPUs used (per replica x replicas) must be a power of two unless
  `ipu.auto_round_num_ipus`; pipelined training needs gradient accumulation of at least
  2 x stages - 1 (each IPU runs a forward and a backward stage, the last IPU's fused); pipelined
  inference needs device iterations of at least the number of stages; phased execution needs its
  phases given explicitly (built here: one per piece, in execution order, on its block's IPU).
- Strategy (`ipu.execution_strategy`): `auto` takes pipelined execution when every IPU holds its
  stage on chip, else phased execution with weights streamed; within a strategy it picks the
  largest micro-batch (fewest pipeline fills or weight reloads) and the fewest vocabulary slices
  that leave headroom, unless the config fixes them. A layout that fits no strategy is refused
  with the per-IPU numbers (`ipu_memory` explains them).
- Blocks per IPU: the layout's own split (balanced by compute) unless `layout.layers_per_stage`
  is unset and a split balanced by parameters fits better: pipelined execution keeps every
  stage's weights on chip, and phased execution runs one IPU at a time, so compute balance buys
  it nothing while spreading parameters spreads code and streamed state. Either way the blocks
  stay contiguous runs in pipeline order, and the plan returned is the one the backend places.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...errors import UserError
from ...layout import LayoutPlan, compact_blocks, partition_costs, pipeline_accumulation_needed, plan_layout
from .memory import (SRAM_BYTES, IpuMemory, Piece, Shapes, StateBytes, phased_ipu, phased_pieces,
                         pipelined_ipu, pipelined_pieces)

# Automatic choices aim below the full SRAM: the estimate is not a compile.
HEADROOM = 0.85
EXECUTIONS = ("pipelined", "phased")


class IpuPlanRefused(UserError):
    """No execution strategy fits the layout; `details` holds the per-IPU tables."""

    def __init__(self, message: str, details: str, attempts: Sequence["IpuPlan"]):
        super().__init__(message)
        self.details = details
        self.attempts = list(attempts)


@dataclass(frozen=True)
class IpuPlan:
    """A layout placed on IPUs with its per-IPU memory; `ipus` covers one replica (all alike)."""

    layout: LayoutPlan
    execution: str
    pieces: Tuple[Piece, ...]
    ipus: Tuple[IpuMemory, ...]
    embedding_serialization_factor: int
    half: bool
    source_length: int
    target_length: int
    inference_device_iterations: int
    # Replicas the streamed weights and optimizer state are sharded over (1: not sharded).
    shards: int
    optimizer_state_offchip: bool

    @property
    def ipus_per_replica(self) -> int:
        return self.layout.stages

    @property
    def replicas(self) -> int:
        return self.layout.replicas

    @property
    def total_ipus(self) -> int:
        return self.ipus_per_replica * self.replicas

    @property
    def fits(self) -> bool:
        return all(ipu.fits for ipu in self.ipus)

    @property
    def peak_bytes(self) -> int:
        return max(ipu.onchip for ipu in self.ipus)

    def phases(self) -> List[Tuple[str, int]]:
        """(piece, IPU) in execution order: the phases of phased execution."""
        return [(piece.name, piece.ipu) for piece in self.pieces]

    def summary(self) -> str:
        """One line: hardware, strategy, precision and the batch split."""
        streamed = "weights streamed" if self.execution == "phased" else "weights on chip"
        return ("{} IPUs per replica x {} replica(s) = {} IPUs, {} execution ({}), {}; micro-batch {} x {} "
                "accumulation x {} replica(s) = global batch {}".format(
                    self.ipus_per_replica, self.replicas, self.total_ipus, self.execution, streamed,
                    "float16" if self.half else "float32", self.layout.micro_batch_size,
                    self.layout.micro_batches, self.replicas, self.layout.global_batch_size))

    def table(self) -> str:
        """The per-IPU table `ipu-t5 plan` prints."""
        mb = lambda n: "{:,.0f}".format(n / 1e6)  # noqa: E731
        header = ["IPU", "blocks", "params (M)", "weights", "grads", "optimizer", "activations", "working",
                  "on chip MB", "streamed MB", "fits"]
        rows = [[str(m.ipu), compact_blocks(m.blocks), "{:,.1f}".format(m.params / 1e6), mb(m.weights),
                 mb(m.gradients), mb(m.optimizer), mb(m.activations), mb(m.working), mb(m.onchip),
                 mb(m.streamed), "yes" if m.fits else "NO"] for m in self.ipus]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(r, widths)))
        lines = ["Flan-T5 {}: {}".format(self.layout.size.name, self.summary()),
                 "tokens: source {}, target {}; embedding and LM head in {} vocabulary slice(s); optimizer "
                 "state {}{}".format(self.source_length, self.target_length, self.embedding_serialization_factor,
                                     "streamed" if self.optimizer_state_offchip or self.execution == "phased"
                                     else "on chip",
                                     ", sharded over {} replicas".format(self.shards) if self.shards > 1 else ""),
                 line(header)]
        lines += [line(r) for r in rows]
        if self.execution == "phased":
            lines.append("Phased: the on-chip columns are each IPU's largest phase (one sub-layer or vocabulary "
                         "slice at a time); params and streamed cover all its blocks.")
        if self.fits and self.peak_bytes > HEADROOM * SRAM_BYTES:
            lines.append("Tight: the fullest IPU is at {:.0%} of its SRAM, past the {:.0%} this planner aims for; "
                         "check Poplar's memory report before a long run.".format(
                             self.peak_bytes / SRAM_BYTES, HEADROOM))
        lines.append("SRAM {:,.0f} MB per IPU; {}. Estimates (ipu_t5/backends/ipu/memory.py); Poplar's memory report "
                     "after compiling is the authority.".format(
                         SRAM_BYTES / 1e6, "the {} replicas hold the same".format(self.replicas)
                         if self.replicas > 1 else "one replica"))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """The plan as `ipu-t5 plan --json` prints it."""
        n = self.ipus_per_replica
        return {
            "model": self.layout.size.name, "total_ipus": self.total_ipus, "ipus_per_replica": n,
            "replicas": self.replicas, "execution": self.execution,
            "precision": "float16" if self.half else "float32", "fits": self.fits,
            "micro_batch_size": self.layout.micro_batch_size,
            "gradient_accumulation_steps": self.layout.micro_batches,
            "global_batch_size": self.layout.global_batch_size, "device_iterations": 1,
            "inference_device_iterations": self.inference_device_iterations,
            "source_length": self.source_length, "target_length": self.target_length,
            "embedding_serialization_factor": self.embedding_serialization_factor,
            "replicated_tensor_sharding": self.shards > 1, "sram_bytes": SRAM_BYTES,
            "ipus": [{"ipu": m.ipu, "ids": [r * n + m.ipu for r in range(self.replicas)], "blocks": list(m.blocks),
                      "params": m.params, "weights_bytes": m.weights, "gradients_bytes": m.gradients,
                      "optimizer_bytes": m.optimizer, "activations_bytes": m.activations,
                      "working_bytes": m.working, "onchip_bytes": m.onchip, "streamed_bytes": m.streamed,
                      "fits": m.fits, "peak_piece": m.peak_piece} for m in self.ipus],
            "pieces": [{"name": p.name, "ipu": p.ipu, "blocks": list(p.blocks), "params": p.params}
                       for p in self.pieces],
        }


def check_ipu_count(stages: int, replicas: int, auto_round: bool) -> None:
    """poptorch reserves IPUs in powers of two unless asked to round up."""
    total = stages * replicas
    if total & (total - 1) == 0 or auto_round:
        return
    rounded = 1 << total.bit_length()
    raise UserError(
        "{} IPUs per replica x {} replica(s) = {} IPUs, but poptorch reserves IPUs in powers of two: use "
        "stages and replicas whose product is one (e.g. {} x {} = {}), or set ipu.auto_round_num_ipus=true "
        "to reserve {} ({} idle).".format(stages, replicas, total, stages, _pow2_floor(replicas),
                                          stages * _pow2_floor(replicas), rounded, rounded - total))


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _divisors(n: int) -> List[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _slice_choices(vocab_size: int, configured: Optional[int]) -> List[int]:
    if configured is not None:
        if vocab_size % configured:
            raise UserError("ipu.embedding_serialization_factor {} does not divide the vocabulary of {} tokens: "
                            "use one of {}.".format(configured, vocab_size, ", ".join(
                                str(k) for k in _slice_choices(vocab_size, None))))
        return [configured]
    return [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if vocab_size % k == 0 and k <= vocab_size]


def balanced_by_parameters(layout: LayoutPlan) -> LayoutPlan:
    """The same layout with blocks split over the stages to even out parameters per IPU."""
    size = layout.size
    costs = [float(size.block_params(b)) for b in size.block_names]
    costs[0] += size.block_params("embedding")
    costs[-1] += size.block_params("lm_head")
    return plan_layout(size, layout.global_batch_size, layout.stages, layout.replicas, layout.micro_batch_size,
                       None, partition_costs(costs, layout.stages), layout.schedule)


def _layouts(config, layout: LayoutPlan, execution: str) -> List[LayoutPlan]:
    if config.layout.layers_per_stage is not None or layout.stages == 1:
        return [layout]
    variants = [layout, balanced_by_parameters(layout)]
    if execution == "phased":
        variants.reverse()
    return [v for i, v in enumerate(variants) if v.stage_blocks not in [w.stage_blocks for w in variants[:i]]]


def _build(layout: LayoutPlan, execution: str, micro: int, slices: int, source: int, target: int,
           state: StateBytes, half: bool, inference_iterations: int) -> IpuPlan:
    per_replica = layout.micro_batch_size * layout.micro_batches
    layout = dataclasses.replace(layout, micro_batch_size=micro, micro_batches=per_replica // micro)
    size = layout.size
    shapes = Shapes(micro, source, target, state.weight)
    cut = pipelined_pieces if execution == "pipelined" else phased_pieces
    pieces = cut(size, layout.stage_blocks, slices)
    ipus = []
    for ipu in range(layout.stages):
        mine = [p for p in pieces if p.ipu == ipu]
        if execution == "pipelined":
            ipus.append(pipelined_ipu(size, ipu, layout.stages, mine, shapes, state, slices))
        else:
            ipus.append(phased_ipu(size, ipu, mine, shapes, state, slices))
    return IpuPlan(layout=layout, execution=execution, pieces=tuple(pieces), ipus=tuple(ipus),
                   embedding_serialization_factor=slices, half=half, source_length=source,
                   target_length=target, inference_device_iterations=inference_iterations,
                   shards=state.shards, optimizer_state_offchip=state.optimizer_offchip or execution == "phased")


def plan_ipu(config, layout: LayoutPlan, source_length: int, target_length: int) -> IpuPlan:
    """Place `layout` on IPUs for a RunConfig and the data's token lengths, or refuse.

    Raises UserError for a rule poptorch would reject at compile time and IpuPlanRefused (a
    UserError with the per-IPU tables in `details`) when no strategy fits the SRAM.
    """
    ipu = config.ipu
    check_ipu_count(layout.stages, layout.replicas, ipu.auto_round_num_ipus)
    half = config.training.fp16 is not False
    shards = layout.replicas if ipu.replicated_tensor_sharding and layout.replicas > 1 else 1
    fixed_split = config.layout.micro_batch_size is not None or config.layout.gradient_accumulation_steps is not None
    per_replica = layout.micro_batch_size * layout.micro_batches
    needed = pipeline_accumulation_needed(layout.stages)
    slices = _slice_choices(layout.size.vocab_size, ipu.embedding_serialization_factor)
    executions = EXECUTIONS if ipu.execution_strategy == "auto" else (ipu.execution_strategy,)
    attempts: List[IpuPlan] = []
    reasons: List[str] = []
    for execution in executions:
        if execution == "pipelined":
            micros = [m for m in ([layout.micro_batch_size] if fixed_split else _divisors(per_replica))
                      if per_replica // m >= needed]
            if not micros:
                reason = (
                    "a training pipeline over {} IPUs runs {} stages (forward and backward, the last fused), so "
                    "poptorch needs gradient accumulation >= {}, but {}".format(
                        layout.stages, needed, needed,
                        "the layout gives {} micro-batch(es) per replica: lower layout.micro_batch_size or raise "
                        "training.global_batch_size".format(layout.micro_batches) if fixed_split else
                        "each replica's share of the global batch is {} samples: raise training.global_batch_size "
                        "to at least {}".format(per_replica, needed * layout.replicas)))
                if len(executions) == 1:
                    raise UserError(reason + ".")
                reasons.append("pipelined: " + reason)
                continue
            iterations = ipu.inference_device_iterations or layout.stages
            if iterations < layout.stages:
                raise UserError("pipelined inference over {} IPUs needs at least {} device iterations, but "
                                "ipu.inference_device_iterations is {}: raise it to {} or more.".format(
                                    layout.stages, layout.stages, iterations, layout.stages))
        else:
            # Phased execution has no pipeline to fill, but the layout plan keeps at least one
            # micro-batch per stage (`plan_layout`), so a plan exported and read back stays valid.
            micros = [layout.micro_batch_size] if fixed_split else [
                m for m in _divisors(per_replica) if per_replica // m >= layout.stages]
            iterations = ipu.inference_device_iterations or 1
        state = StateBytes(weight=2 if half else 4,
                           optimizer_offchip=ipu.optimizer_state_offchip or execution == "phased",
                           shards=shards, matmul_proportion=ipu.matmul_proportion,
                           recompute=ipu.recompute_checkpoint_every_layer)
        candidates = [_build(variant, execution, m, k, source_length, target_length, state, half, iterations)
                      for variant in _layouts(config, layout, execution) for m in micros for k in slices]
        chosen = _choose(candidates, automatic=len(candidates) > 1)
        if chosen is not None:
            return chosen
        attempts.append(min(candidates, key=lambda p: p.peak_bytes))
    raise _refusal(layout, attempts, reasons)


def _choose(candidates: Sequence[IpuPlan], automatic: bool) -> Optional[IpuPlan]:
    """When choosing automatically: the first candidate (largest micro-batch, then fewest slices)
    under the headroom target, else the fitting one with the most room; with nothing to choose,
    the candidate if it fits."""
    if automatic:
        for plan in candidates:
            if plan.peak_bytes <= HEADROOM * SRAM_BYTES:
                return plan
    fitting = [plan for plan in candidates if plan.fits]
    return min(fitting, key=lambda plan: plan.peak_bytes) if fitting else None


def _refusal(layout: LayoutPlan, attempts: Sequence[IpuPlan], reasons: Sequence[str]) -> IpuPlanRefused:
    worst = ["{} execution needs {:,.0f} MB on IPU {}".format(
        p.execution, p.peak_bytes / 1e6, max(p.ipus, key=lambda m: m.onchip).ipu) for p in attempts]
    message = ("Flan-T5 {} does not fit {} IPU(s) per replica x {} replica(s): {} ({:,.0f} MB of SRAM each). "
               "Try more replicas (replicated tensor sharding splits the streamed optimizer state), shorter prompts "
               "(data.max_source_length), a lower ipu.matmul_proportion, or, for a pipeline, more IPUs per replica "
               "(--stages); `ipu-t5 plan` prints the per-IPU table.".format(
                   layout.size.name, layout.stages, layout.replicas, "; ".join(worst + list(reasons)),
                   SRAM_BYTES / 1e6))
    return IpuPlanRefused(message, "\n\n".join(p.table() for p in attempts), attempts)
