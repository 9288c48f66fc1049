"""The layout plan mapped onto Graphcore IPUs: execution strategy, what each IPU holds, the step
estimate, and the rules poptorch enforces at compile time, checked here first so nobody waits for
a compile to learn them.

- IPUs per replica = the plan's stages, replicas = poptorch's replication factor, micro-batches =
  gradient accumulation. Training runs one device iteration per call (the trainer sets the
  learning rate and logs every step) and asks for the loss summed over the micro-batches
  (`OutputMode.Sum`); inference returns every output (`OutputMode.All`).
- Rules: IPUs used (per replica x replicas) must be a power of two unless
  `ipu.auto_round_num_ipus`; pipelined training needs gradient accumulation of at least
  2 x stages - 1 (each IPU runs a forward and a backward stage, the last IPU's fused); pipelined
  inference needs device iterations of at least the number of stages; phased execution needs its
  phases given explicitly (built here, every one split over the IPUs of its phase).
- Strategy (`ipu.execution_strategy`): `auto` takes pipelined execution when every IPU holds its
  stage on chip, else phased execution with weights streamed. Pipelined: the largest micro-batch
  (fewest pipeline fills) and the fewest vocabulary slices that leave headroom, unless the config
  fixes them. Phased: every IPU of the replica computes its share of every phase; serial phasing
  (every phase on all the IPUs) or parallel phasing (two alternating groups, one streaming the
  next phase while the other computes), the micro-batch and the vocabulary slices are chosen by
  the step estimate (`cost.py`): the fastest that leaves headroom, and the plan says why. A
  layout that fits no strategy is refused with the per-IPU numbers.
- Blocks per IPU (pipelined): the split balanced by compute (a layout cut by memory, the other
  backends' default, is cut again by compute here) unless `layout.layers_per_stage` is unset and a
  split balanced by parameters fits better; the blocks
  stay contiguous runs in pipeline order, and the plan returned is the one the backend places.
"""
import dataclasses
from typing import List, Optional, Sequence

from ...errors import UserError
from ...layout import LayoutPlan, partition_costs, phased_only, pipeline_accumulation_needed, plan_layout
from .batch_serial import SerialSchedule, serial_cost, slice_sizes
from .calibration import calibrate
from .cost import pipelined_cost, seconds, split_cost
from .generation_cost import GenerationCost, best_generation, kv_batch
from .memory import (SRAM_BYTES, Shapes, StateBytes, pipelined_ipu, pipelined_pieces, split_ipu, split_phases)
from .report import HEADROOM, IpuPlan

EXECUTIONS = ("pipelined", "phased")
PHASINGS = ("serial", "parallel")


class IpuPlanRefused(UserError):
    """No execution strategy fits the layout; `details` holds the per-IPU tables."""

    def __init__(self, message: str, details: str, attempts: Sequence[IpuPlan]):
        super().__init__(message)
        self.details = details
        self.attempts = list(attempts)


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


def _layouts(config, layout: LayoutPlan) -> List[LayoutPlan]:
    if config.layout.layers_per_stage is not None or layout.stages == 1:
        return [layout]
    variants = [layout, balanced_by_parameters(layout)]
    return [v for i, v in enumerate(variants) if v.stage_blocks not in [w.stage_blocks for w in variants[:i]]]


def _with_micro(layout: LayoutPlan, micro: int) -> LayoutPlan:
    per_replica = layout.micro_batch_size * layout.micro_batches
    return dataclasses.replace(layout, micro_batch_size=micro, micro_batches=per_replica // micro)


def _build_pipelined(layout: LayoutPlan, micro: int, slices: int, source: int, target: int, state: StateBytes,
                     half: bool, inference_iterations: int) -> IpuPlan:
    layout = _with_micro(layout, micro)
    size = layout.size
    shapes = Shapes(micro, source, target, state.weight)
    pieces = pipelined_pieces(size, layout.stage_blocks, slices)
    ipus = tuple(pipelined_ipu(size, ipu, layout.stages, [p for p in pieces if p.ipu == ipu], shapes, state, slices)
                 for ipu in range(layout.stages))
    slowest = max(range(layout.stages), key=lambda i: layout.stage_flops(i, source, target))
    estimate = pipelined_cost(size, layout.stage_flops(slowest, source, target), max(m.params for m in ipus),
                              layout.stages, shapes, layout.micro_batches, layout.replicas, state.shards,
                              state.optimizer_offchip, state.recompute, layout.global_batch_size)
    return IpuPlan(layout=layout, execution="pipelined", pieces=tuple(pieces), ipus=ipus,
                   embedding_serialization_factor=slices, half=half, source_length=source,
                   target_length=target, inference_device_iterations=inference_iterations,
                   shards=state.shards, optimizer_state_offchip=state.optimizer_offchip, cost=estimate)


def _build_phased(layout: LayoutPlan, phasing: str, micro: int, slices: int, source: int, target: int,
                  state: StateBytes, half: bool, inference_iterations: int,
                  schedule: Optional[SerialSchedule] = None) -> IpuPlan:
    """A phased plan: `micro`-sample micro-batches accumulated, or, with `schedule`, one micro-batch
    per replica batch-serialised into `schedule.factor` slices (`micro` is then the slice)."""
    per_replica = layout.micro_batch_size * layout.micro_batches
    layout = _with_micro(layout, per_replica if schedule is not None else micro)
    size, n = layout.size, layout.stages
    parts = n if phasing == "serial" else n // 2
    # What is live on chip is one slice's (or micro-batch's) working set.
    shapes = Shapes(micro, source, target, state.weight)
    phases = split_phases(size, parts, slices)
    # IPUs of one group hold alike except part 0 (which combines the LM head's slices): work out
    # each kind once.
    kinds = {}
    ipus = []
    for ipu in range(n):
        group, part = (0, ipu) if phasing == "serial" else (ipu % 2, ipu // 2)
        key = (group, part == 0)
        if key not in kinds:
            kinds[key] = split_ipu(size, ipu, phases[group::1 if phasing == "serial" else 2], part, parts, shapes,
                                   state, slices)
        ipus.append(dataclasses.replace(kinds[key], ipu=ipu))
    if schedule is None:
        estimate = split_cost(size, phases, shapes, parts, slices, layout.micro_batches, layout.replicas,
                              state.shards, phasing, layout.global_batch_size)
    else:
        estimate = serial_cost(size, phases, shapes, parts, slices, schedule.factor, layout.replicas, state.shards,
                               schedule.recompute, layout.global_batch_size)
    return IpuPlan(layout=layout, execution="phased", pieces=(), ipus=tuple(ipus),
                   embedding_serialization_factor=slices, half=half, source_length=source,
                   target_length=target, inference_device_iterations=inference_iterations,
                   shards=state.shards, optimizer_state_offchip=True, cost=estimate, phasing=phasing,
                   split_phases=tuple(phases), batch_serial=schedule)


def split_refusal(size, parts: int) -> Optional[str]:
    """Why a phase cannot be split `parts` ways (heads, hidden and inner units must divide), or None."""
    for what, count in (("attention heads", size.num_heads), ("hidden units", size.d_model),
                        ("feed-forward units", size.d_ff)):
        if count % parts:
            return "its {} {} do not split {} ways".format(count, what, parts)
    return None


def _phased_candidates(config, layout: LayoutPlan, micros: Sequence[int], source: int, target: int,
                       state: StateBytes, half: bool, iterations: int, phasings: Sequence[str],
                       reasons: List[str]) -> List[IpuPlan]:
    size, n = layout.size, layout.stages
    per_replica = layout.micro_batch_size * layout.micro_batches
    # Batch serialisation slices one micro-batch per replica; a fixed split fixes the slice too.
    serial_slices = micros if len(micros) == 1 and micros[0] < per_replica else slice_sizes(per_replica)
    recomputes = (False, True) if state.recompute else (False,)
    candidates = []
    for phasing in phasings:
        parts = n if phasing == "serial" else n // 2
        if phasing == "parallel" and (n < 2 or n % 2):
            reasons.append("parallel phases alternate between two groups of IPUs: {} per replica do not halve"
                           .format(n))
            continue
        why = split_refusal(size, parts)
        if why is not None:
            reasons.append("{} phases on {} IPUs: {}".format(phasing, parts, why))
            continue
        for slices in _split_slices(size.vocab_size, parts, config.ipu.embedding_serialization_factor):
            candidates += [_build_phased(layout, phasing, m, slices, source, target, state, half, iterations)
                           for m in micros]
            if phasing == "serial":
                candidates += [_build_phased(layout, phasing, b, slices, source, target, state, half, iterations,
                                             SerialSchedule(per_replica // b, b, recompute))
                               for b in serial_slices for recompute in recomputes]
    return candidates


def _split_slices(vocab_size: int, parts: int, configured: Optional[int]) -> List[int]:
    """Vocabulary slices for split phases: whole slices on each IPU of a phase."""
    if configured is not None:
        if configured % parts or vocab_size % configured:
            raise UserError("ipu.embedding_serialization_factor {} must divide the vocabulary of {} tokens into "
                            "whole slices for each of the {} IPUs of a phase: use one of {}, or leave it unset."
                            .format(configured, vocab_size, parts, ", ".join(
                                str(k) for k in _split_slices(vocab_size, parts, None))))
        return [configured]
    return [parts * k for k in (1, 2, 4, 8) if vocab_size % (parts * k) == 0]


def _phasing_reason(chosen: IpuPlan, candidates: Sequence[IpuPlan], reasons: Sequence[str]) -> str:
    """Why the chosen phasing: its estimate against the best of the other phasing."""
    words = {"serial": "serial phases (every phase on all {} IPUs)",
             "parallel": "parallel phases (two groups of {} alternating)"}
    chosen_words = words[chosen.phasing].format(chosen.ipus_per_phase)
    others = [c for c in candidates if c.phasing != chosen.phasing]
    fitting = [c for c in others if c.fits]
    if fitting:
        best = min(fitting, key=lambda c: c.cost.step_seconds)
        serial = chosen if chosen.phasing == "serial" else best
        return ("{}: {} s per step estimated, against {} s for {}. Parallel phases hide one group's streaming "
                "under the other's compute, but run each phase on half the IPUs, which doubles both; here "
                "streaming takes {} s and compute and exchange {} s under serial phases.".format(
                    chosen_words, seconds(chosen.cost.step_seconds), seconds(best.cost.step_seconds),
                    words[best.phasing].format(best.ipus_per_phase), seconds(serial.cost.streaming_seconds),
                    seconds(serial.cost.compute_seconds + serial.cost.exchange_seconds)))
    if others:
        return "{}: {} does not fit ({:,.0f} MB on its fullest IPU).".format(
            chosen_words, words[others[0].phasing].format(others[0].ipus_per_phase),
            min(c.peak_bytes for c in others) / 1e6)
    return "{}{}.".format(chosen_words, "; " + "; ".join(reasons) if reasons else "")


def _validation(config, plan: IpuPlan, state: StateBytes) -> GenerationCost:
    """Validation with the key/value cache on this plan's phases, at the calibrated rates."""
    return best_generation(plan.layout.size, plan.split_phases, plan.ipus_per_phase, plan.embedding_serialization_factor,
                           kv_batch(config.validation.per_device_eval_batch_size, plan.replicas), plan.replicas,
                           plan.shards, plan.source_length, config.validation.max_new_tokens or plan.target_length,
                           state.weight, state.matmul_proportion, HEADROOM, rates=calibrate().rates)


def _schedule_reason(chosen: IpuPlan, other: Optional[IpuPlan]) -> str:
    """Why batch serialisation or gradient accumulation: bytes streamed per IPU and the step."""
    def words(plan: IpuPlan) -> str:
        return "{} ({:,.1f} GB to and from Streaming Memory per IPU per step, {} s)".format(
            plan.schedule_words(), plan.cost.streamed_bytes / 1e9, seconds(plan.cost.step_seconds))
    if other is None:
        return "Schedule: {}; the other schedule does not fit.".format(words(chosen))
    return "Schedule: {}, against {}.".format(words(chosen), words(other))


def plan_ipu(config, layout: LayoutPlan, source_length: int, target_length: int,
             phasings: Sequence[str] = PHASINGS) -> IpuPlan:
    """Place `layout` on IPUs for a RunConfig and the data's token lengths, or refuse.

    Raises UserError for a rule poptorch would reject at compile time and IpuPlanRefused (a
    UserError with the per-IPU tables in `details`) when no strategy fits the SRAM. `phasings`
    narrows the phased execution considered (tests use it to build a parallel plan).
    """
    ipu = config.ipu
    check_ipu_count(layout.stages, layout.replicas, ipu.auto_round_num_ipus)
    if layout.split_by == "memory":
        # The IPU's candidates are the compute-balanced cut and the parameter-balanced one below.
        layout = plan_layout(layout.size, layout.global_batch_size, layout.stages, layout.replicas,
                             layout.micro_batch_size, None, None, layout.schedule, source_length, target_length,
                             pipelined=not phased_only(config), split_by="compute")
    half = config.training.fp16 is not False
    shards = layout.replicas if ipu.replicated_tensor_sharding and layout.replicas > 1 else 1
    fixed_split = config.layout.micro_batch_size is not None or config.layout.gradient_accumulation_steps is not None
    per_replica = layout.micro_batch_size * layout.micro_batches
    needed = pipeline_accumulation_needed(layout.stages)
    executions = EXECUTIONS if ipu.execution_strategy == "auto" else (ipu.execution_strategy,)
    attempts: List[IpuPlan] = []
    reasons: List[str] = []
    for execution in executions:
        state = StateBytes(weight=2 if half else 4,
                           optimizer_offchip=ipu.optimizer_state_offchip or execution == "phased",
                           shards=shards, matmul_proportion=ipu.matmul_proportion,
                           recompute=ipu.recompute_checkpoint_every_layer)
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
            candidates = [_build_pipelined(variant, m, k, source_length, target_length, state, half, iterations)
                          for variant in _layouts(config, layout) for m in micros
                          for k in _slice_choices(layout.size.vocab_size, ipu.embedding_serialization_factor)]
            chosen = _choose_first(candidates, automatic=len(candidates) > 1)
        else:
            # No pipeline to fill: any micro-batch that divides the replica's share (a plan exported
            # with fewer micro-batches than IPUs reads back as phased: ipu_config.py).
            micros = [layout.micro_batch_size] if fixed_split else _divisors(per_replica)
            iterations = ipu.inference_device_iterations or 1
            candidates = _phased_candidates(config, layout, micros, source_length, target_length, state, half,
                                            iterations, phasings, reasons)
            chosen = _choose_fastest(candidates)
            if chosen is not None:
                other = _choose_fastest([c for c in candidates if (c.batch_serial is None) != (chosen.batch_serial is None)])
                chosen = dataclasses.replace(chosen, other_schedule=other, generation=_validation(config, chosen, state),
                                             reason=" ".join([_phasing_reason(chosen, candidates, reasons),
                                                              _schedule_reason(chosen, other)]))
        if chosen is not None:
            return chosen
        if candidates:
            attempts.append(min(candidates, key=lambda p: p.peak_bytes))
    raise _refusal(layout, attempts, reasons)


def _choose_first(candidates: Sequence[IpuPlan], automatic: bool) -> Optional[IpuPlan]:
    """When choosing automatically: the first candidate (largest micro-batch, then fewest slices)
    under the headroom target, else the fitting one with the most room; with nothing to choose,
    the candidate if it fits."""
    if automatic:
        for plan in candidates:
            if plan.peak_bytes <= HEADROOM * SRAM_BYTES:
                return plan
    fitting = [plan for plan in candidates if plan.fits]
    return min(fitting, key=lambda plan: plan.peak_bytes) if fitting else None


def _choose_fastest(candidates: Sequence[IpuPlan]) -> Optional[IpuPlan]:
    """The fastest estimated step under the headroom target, else the fastest that fits; among
    estimates equal to a microsecond, the largest slices (fewer, larger matmuls per phase)."""
    def key(plan: IpuPlan):
        unit = plan.batch_serial.slice_size if plan.batch_serial else plan.layout.micro_batch_size
        return round(plan.cost.step_seconds, 6), -unit
    for pool in ([p for p in candidates if p.peak_bytes <= HEADROOM * SRAM_BYTES], [p for p in candidates if p.fits]):
        if pool:
            return min(pool, key=key)
    return None


def _refusal(layout: LayoutPlan, attempts: Sequence[IpuPlan], reasons: Sequence[str]) -> IpuPlanRefused:
    worst = ["{} execution needs {:,.0f} MB on IPU {}".format(
        p.execution, p.peak_bytes / 1e6, max(p.ipus, key=lambda m: m.onchip).ipu) for p in attempts]
    message = ("Flan-T5 {} does not fit {} IPU(s) per replica x {} replica(s): {} ({:,.0f} MB of SRAM each). "
               "Try more IPUs per replica (--stages), more replicas (replicated tensor sharding splits the streamed "
               "state), shorter prompts (data.max_source_length) or a lower ipu.matmul_proportion; `ipu-t5 plan` "
               "prints the per-IPU table.".format(
                   layout.size.name, layout.stages, layout.replicas, "; ".join(worst + list(reasons)),
                   SRAM_BYTES / 1e6))
    return IpuPlanRefused(message, "\n\n".join(p.table() for p in attempts), attempts)
