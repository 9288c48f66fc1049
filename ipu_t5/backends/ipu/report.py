"""An IPU plan: a layout placed on IPUs with its per-IPU memory and step estimate, as the table
and the JSON that `ipu-t5 plan` prints."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ...layout import LayoutPlan, compact_blocks
from . import cost
from .batch_serial import SerialSchedule
from .calibration import GRAPHCORE_BATCH, GRAPHCORE_LENGTH, Calibration, calibrate
from .cost import StepCost, seconds
from .generation_cost import GenerationCost
from .memory import SRAM_BYTES, IpuMemory, Piece, SplitPhase

# Automatic choices aim below the full SRAM: the estimate is not a compile.
HEADROOM = 0.85
# Graphcore's measured seconds per step for its own Flan-T5 fine-tuning (global batch 128,
# 512-token prompts), by model and IPUs: XXL on a Pod16, XL on a Pod8.
PUBLISHED_STEP_SECONDS = {("xxl", 16): 36.0, ("xl", 8): 16.0}
PUBLISHED_SETTINGS = "global batch 128, 512-token prompts"


@dataclass(frozen=True)
class IpuPlan:
    """A layout placed on IPUs with its per-IPU memory; `ipus` covers one replica (all alike)."""

    layout: LayoutPlan
    execution: str
    # Pipelined execution: one piece per block on its stage's IPU.
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
    cost: StepCost
    # Phased execution: "serial" (every phase on all the replica's IPUs) or "parallel" (phases
    # alternate between the even and the odd IPUs), the phases in order, and why this phasing.
    phasing: Optional[str] = None
    split_phases: Tuple[SplitPhase, ...] = ()
    reason: str = ""
    # Phased execution batch-serialised (one micro-batch per replica sliced inside the program),
    # or None for gradient accumulation; and the best plan of the other schedule, for comparison.
    batch_serial: Optional[SerialSchedule] = None
    other_schedule: Optional["IpuPlan"] = None
    # Phased execution: validation with the key/value cache, at the calibrated rates.
    generation: Optional[GenerationCost] = None

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
    def ipus_per_phase(self) -> int:
        if self.execution == "pipelined":
            return 1
        return self.ipus_per_replica if self.phasing == "serial" else self.ipus_per_replica // 2

    @property
    def fits(self) -> bool:
        return all(ipu.fits for ipu in self.ipus)

    @property
    def peak_bytes(self) -> int:
        return max(ipu.onchip for ipu in self.ipus)

    def phase_ipus(self, index: int) -> Tuple[int, ...]:
        """The IPUs of phase `index`, part j on the j-th: poptorch runs parallel phases with even
        phases on even IPUs and odd phases on odd IPUs."""
        n = self.ipus_per_replica
        return tuple(range(n)) if self.phasing == "serial" else tuple(range(index % 2, n, 2))

    def phases(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(phase, its IPUs) in execution order: the phases of phased execution."""
        return [(phase.name, self.phase_ipus(i)) for i, phase in enumerate(self.split_phases)]

    def published_step_seconds(self) -> Optional[float]:
        return PUBLISHED_STEP_SECONDS.get((self.layout.size.name, self.total_ipus))

    def schedule_words(self) -> str:
        """How the step's samples pass through the phases, in words."""
        if self.batch_serial is not None:
            b = self.batch_serial
            return "batch-serialised: {} slices of {} pass through each phase while its weights are resident{}".format(
                b.factor, b.slice_size, ", forward recomputed in the backward" if b.recompute else "")
        return "{} micro-batches of {}, each phase's weights streamed in again for each".format(
            self.layout.micro_batches, self.layout.micro_batch_size)

    def summary(self) -> str:
        """One line: hardware, strategy, precision and the batch split."""
        if self.execution == "phased":
            how = "weights streamed, {} phases on {} IPUs each".format(self.phasing, self.ipus_per_phase)
        else:
            how = "weights on chip"
        serial = "" if self.batch_serial is None else " (batch-serialised into {} slices of {})".format(
            self.batch_serial.factor, self.batch_serial.slice_size)
        return ("{} IPUs per replica x {} replica(s) = {} IPUs, {} execution ({}), {}; micro-batch {}{} x {} "
                "accumulation x {} replica(s) = global batch {}".format(
                    self.ipus_per_replica, self.replicas, self.total_ipus, self.execution, how,
                    "float16" if self.half else "float32", self.layout.micro_batch_size, serial,
                    self.layout.micro_batches, self.replicas, self.layout.global_batch_size))

    def graphcore_workload(self) -> bool:
        """Whether this plan's work is the work of Graphcore's measured runs (their global batch,
        512-token prompts and targets padded to 512)."""
        return (self.layout.global_batch_size == GRAPHCORE_BATCH and self.source_length == GRAPHCORE_LENGTH
                and self.target_length == GRAPHCORE_LENGTH)

    def calibrated(self, calibration: Optional[Calibration] = None) -> Dict[str, float]:
        """The step at the calibrated rates, and at each single-term explanation's: the terms are
        scaled and added (under parallel phases, where streaming hides under compute, an upper bound)."""
        calibration = calibration or calibrate()
        c = self.cost
        terms = {"compute": c.compute_seconds, "streaming": c.streaming_seconds, "links": c.exchange_seconds}
        # One factor on every rate scales any step exactly, overlapped or not.
        estimates = {"calibrated": calibration.factor * c.step_seconds}
        for name, factor in calibration.single.items():
            estimates["only_" + name] = sum(v * (factor if k == name else 1.0) for k, v in terms.items())
        return estimates

    def estimate_lines(self) -> List[str]:
        """The step estimate, its parts and rates, and Graphcore's figure where it has one."""
        c = self.cost
        lines = ["Estimated step: {}.".format(c.describe()),
                 "  per IPU: {:.3g} FLOPs at {:.0f} TFLOPS ({:.0%} of the {:.0f} TFLOPS float16 peak); {:,.1f} GB "
                 "to and from Streaming Memory at {:.0f} GB/s (assumed); {:,.1f} GB over IPU-Links at {:.0f} GB/s"
                 .format(c.flops, cost.MATMUL_EFFICIENCY * cost.PEAK_FLOPS_PER_IPU / 1e12, cost.MATMUL_EFFICIENCY,
                         cost.PEAK_FLOPS_PER_IPU / 1e12, c.streamed_bytes / 1e9,
                         cost.STREAMING_BYTES_PER_SECOND / 1e9, c.exchanged_bytes / 1e9,
                         cost.IPU_LINK_BYTES_PER_SECOND / 1e9)]
        if self.reason:
            lines.append("  " + self.reason)
        lines += self.calibrated_lines()
        if self.generation is not None:
            lines.append(self.generation_line())
        return lines

    def generation_line(self) -> str:
        g = self.generation
        fits = "fits" if g.fits else "does NOT fit"
        if g.best_batch and g.best_batch != g.batch:
            fits += "; validation.per_device_eval_batch_size={} fits with headroom (encoder in chunks of {}): " \
                    "{:.1f} min".format(g.best_batch, g.best_encoder_batch, g.best_seconds / 60)
        return ("Validation of {:,} prompts (greedy, {} batches of {}; kv_generation.py): {:.1f} min calibrated with "
                "the key/value cache (per batch an encoder executor of the embedding and encoder phases in chunks of "
                "{}, then a decoder-step executor of the embedding, decoder and LM head phases per token over the "
                "whole batch, its weights streamed once per token for all of it, both on these IPUs; every batch "
                "counted at its full new tokens, which stopping once every prompt has ended only shortens; fullest "
                "IPU {:,.0f} MB, {}), against {:.1f} min re-running the whole model per token.".format(
                    g.prompts, g.calls, g.batch, g.seconds / 60, g.encoder_batch, g.peak_bytes / 1e6, fits,
                    g.whole_model_seconds / 60))

    def calibrated_lines(self) -> List[str]:
        """The estimate at rates calibrated on Graphcore's runs, and how it compares with theirs."""
        calibration = calibrate()
        e = self.calibrated(calibration)
        singles = [e["only_" + name] for name in ("compute", "streaming", "links")]
        lines = ["Calibrated on Graphcore's two published runs (every rate {:.2f} times slower than above; "
                 "docs/ipu.md, 'The cost model'): {} s per step; {} to {} s if only one rate is off (compute "
                 "{} s, Streaming Memory {} s, IPU-Links {} s).".format(
                     calibration.factor, seconds(e["calibrated"]), seconds(min(singles)), seconds(max(singles)),
                     *[seconds(v) for v in singles])]
        published = self.published_step_seconds()
        if published is not None:
            if self.graphcore_workload():
                lines.append("  Same work as Graphcore's measured run (global batch 128, 512-token prompts, targets "
                             "padded to 512): they took about {:.0f} s per step for Flan-T5 {} on {} IPUs.".format(
                                 published, self.layout.size.name.upper(), self.total_ipus))
            else:
                lines.append("  Not Graphcore's workload ({}-token targets, {}-token prompts, global batch {}; "
                             "theirs: 512, 512, 128, about {:.0f} s per step): `--source-length 512 "
                             "--target-length 512` compares like with like.".format(
                                 self.target_length, self.source_length, self.layout.global_batch_size, published))
        return lines

    def table(self) -> str:
        """The per-IPU table `ipu-t5 plan` prints."""
        mb = lambda n: "{:,.0f}".format(n / 1e6)  # noqa: E731
        header = ["IPU", "blocks", "params (M)", "weights", "grads", "optimizer", "activations", "partials",
                  "working", "on chip MB", "streamed MB", "fits"]
        rows = [[str(m.ipu), compact_blocks(m.blocks), "{:,.1f}".format(m.params / 1e6), mb(m.weights),
                 mb(m.gradients), mb(m.optimizer), mb(m.activations), mb(m.partials), mb(m.working), mb(m.onchip),
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
            lines.append("Phased: every phase (a sub-layer, the embedding or the LM head) is split over {} IPUs; the "
                         "on-chip columns are each IPU's fullest phase (its share of one phase at a time), params "
                         "and streamed cover its share of every phase.".format(self.ipus_per_phase))
        lines += self.estimate_lines()
        if self.fits and self.peak_bytes > HEADROOM * SRAM_BYTES:
            lines.append("Tight: the fullest IPU is at {:.0%} of its SRAM, past the {:.0%} this planner aims for; "
                         "check Poplar's memory report before a long run.".format(
                             self.peak_bytes / SRAM_BYTES, HEADROOM))
        lines.append("SRAM {:,.0f} MB per IPU; {}. Estimates (ipu_t5/backends/ipu/memory.py, cost.py); Poplar's memory "
                     "report after compiling and a first run's step time are the authority.".format(
                         SRAM_BYTES / 1e6, "the {} replicas hold the same".format(self.replicas)
                         if self.replicas > 1 else "one replica"))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """The plan as `ipu-t5 plan --json` prints it."""
        n, c = self.ipus_per_replica, self.cost
        data = {
            "model": self.layout.size.name, "total_ipus": self.total_ipus, "ipus_per_replica": n,
            "replicas": self.replicas, "execution": self.execution, "phasing": self.phasing,
            "ipus_per_phase": self.ipus_per_phase,
            "precision": "float16" if self.half else "float32", "fits": self.fits,
            "micro_batch_size": self.layout.micro_batch_size,
            "gradient_accumulation_steps": self.layout.micro_batches,
            "global_batch_size": self.layout.global_batch_size, "device_iterations": 1,
            "inference_device_iterations": self.inference_device_iterations,
            "source_length": self.source_length, "target_length": self.target_length,
            "embedding_serialization_factor": self.embedding_serialization_factor,
            "replicated_tensor_sharding": self.shards > 1, "sram_bytes": SRAM_BYTES,
            "estimated_step_seconds": c.step_seconds, "compute_seconds": c.compute_seconds,
            "streaming_seconds": c.streaming_seconds, "exchange_seconds": c.exchange_seconds,
            "samples_per_second": c.samples_per_second, "flops_per_ipu": c.flops,
            "streamed_bytes_per_ipu": c.streamed_bytes, "exchanged_bytes_per_ipu": c.exchanged_bytes,
            "rates": {"peak_flops_per_ipu": cost.PEAK_FLOPS_PER_IPU, "matmul_efficiency": cost.MATMUL_EFFICIENCY,
                      "streaming_bytes_per_second": cost.STREAMING_BYTES_PER_SECOND,
                      "ipu_link_bytes_per_second": cost.IPU_LINK_BYTES_PER_SECOND},
            "phasing_reason": self.reason or None,
            "batch_serialization_factor": self.batch_serial.factor if self.batch_serial else None,
            "batch_serial_slice_size": self.batch_serial.slice_size if self.batch_serial else None,
            "batch_serial_recompute": self.batch_serial.recompute if self.batch_serial else None,
            "other_schedule_streamed_bytes_per_ipu": (self.other_schedule.cost.streamed_bytes
                                                      if self.other_schedule else None),
            "other_schedule_step_seconds": self.other_schedule.cost.step_seconds if self.other_schedule else None,
            "calibrated_step_seconds": self.calibrated(),
            "graphcore_workload": self.graphcore_workload(),
            "validation": None if self.generation is None else {
                "prompts": self.generation.prompts, "batch": self.generation.batch, "calls": self.generation.calls,
                "kv_cache_seconds": self.generation.seconds, "whole_model_seconds": self.generation.whole_model_seconds,
                "peak_bytes": self.generation.peak_bytes, "fits": self.generation.fits,
                "encoder_batch": self.generation.encoder_batch,
                "best_batch": self.generation.best_batch or None,
                "best_encoder_batch": self.generation.best_encoder_batch or None,
                "best_batch_kv_cache_seconds": self.generation.best_seconds or None},
            "published_step_seconds": self.published_step_seconds(),
            "ipus": [{"ipu": m.ipu, "ids": [r * n + m.ipu for r in range(self.replicas)], "blocks": list(m.blocks),
                      "params": m.params, "weights_bytes": m.weights, "gradients_bytes": m.gradients,
                      "optimizer_bytes": m.optimizer, "activations_bytes": m.activations,
                      "partials_bytes": m.partials, "working_bytes": m.working, "onchip_bytes": m.onchip,
                      "streamed_bytes": m.streamed, "fits": m.fits, "peak_piece": m.peak_piece} for m in self.ipus],
        }
        if self.execution == "phased":
            data["phases"] = [{"name": p.name, "ipus": list(self.phase_ipus(i)), "blocks": list(p.blocks),
                               "params": p.params, "params_per_ipu": p.share} for i, p in enumerate(self.split_phases)]
        else:
            data["pieces"] = [{"name": p.name, "ipu": p.ipu, "blocks": list(p.blocks), "params": p.params}
                              for p in self.pieces]
        return data
