"""An IPU plan: a layout placed on IPUs with its per-IPU memory and step estimate, as the table
and the JSON that `ipu-t5 plan` prints."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ...layout import LayoutPlan, compact_blocks
from . import cost
from .cost import StepCost
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

    def summary(self) -> str:
        """One line: hardware, strategy, precision and the batch split."""
        if self.execution == "phased":
            how = "weights streamed, {} phases on {} IPUs each".format(self.phasing, self.ipus_per_phase)
        else:
            how = "weights on chip"
        return ("{} IPUs per replica x {} replica(s) = {} IPUs, {} execution ({}), {}; micro-batch {} x {} "
                "accumulation x {} replica(s) = global batch {}".format(
                    self.ipus_per_replica, self.replicas, self.total_ipus, self.execution, how,
                    "float16" if self.half else "float32", self.layout.micro_batch_size,
                    self.layout.micro_batches, self.replicas, self.layout.global_batch_size))

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
        published = self.published_step_seconds()
        if published is not None:
            lines.append("  Graphcore's published figure for Flan-T5 {} on {} IPUs: about {:.0f} s per step ({:.1f} "
                         "samples/s) at {}.".format(self.layout.size.name.upper(), self.total_ipus, published,
                                                    128 / published, PUBLISHED_SETTINGS))
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
