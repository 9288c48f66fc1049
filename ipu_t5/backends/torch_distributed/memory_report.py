"""The torch backend's memory plan against the memory there is: the table and JSON `ipu-t5 plan
--backend torch` prints, and the check `ipu-t5 train` makes before any weight is read.

The memory compared with: each GPU's (torch.cuda where present, or `--device-memory`), else the
host's RAM, shared by the node's processes and the launcher (psutil). No torch.distributed here.
"""
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ...errors import UserError
from ...layout import LayoutPlan, compact_blocks
from .memory import GPUS, LAUNCHER_BYTES, MemoryPlan, gpu_fits, plan_memory

UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """`80GB`, `40GiB`, `512MB` or a number of bytes."""
    found = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not found or found.group(2).lower() not in UNITS:
        raise UserError("device memory '{}' is not a size: write it like 80GB, 40GiB or 512MB.".format(text))
    return int(float(found.group(1)) * UNITS[found.group(2).lower()])


@dataclass(frozen=True)
class Memory:
    """What the plan is compared with: "gpu" (bytes per GPU) or "cpu" (the host's bytes)."""

    device: str
    bytes: int
    what: str


def available_memory(device_memory: Optional[str] = None) -> Memory:
    """The given GPU memory, this machine's smallest GPU, or its RAM."""
    if device_memory:
        return Memory("gpu", parse_bytes(device_memory), "{} per GPU (--device-memory)".format(device_memory))
    import torch

    if torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        smallest = min(sizes, key=lambda p: p.total_memory)
        return Memory("gpu", smallest.total_memory, "{:.1f} GB per GPU ({})".format(smallest.total_memory / 1e9,
                                                                                 smallest.name))
    import psutil

    total = psutil.virtual_memory().total
    return Memory("cpu", total, "{:.1f} GB of host RAM".format(total / 1e9))


@dataclass(frozen=True)
class MemoryReport:
    """A memory plan, the memory it is compared with, and the GPUs it would fit."""

    plan: MemoryPlan
    memory: Memory
    nodes: int
    gpus: Tuple[Tuple[str, int, bool], ...]

    @property
    def per_node(self) -> int:
        return len(self.plan.ranks) // self.nodes

    @property
    def fits(self) -> bool:
        if self.memory.device == "gpu":
            return self.plan.largest_process_bytes <= self.memory.bytes
        return self.plan.node_sum_bytes(self.nodes) <= self.memory.bytes

    def summary(self) -> str:
        layout = self.plan.layout
        if layout.world_size == 1:
            where = "a GPU" if self.memory.device == "gpu" else "the CPU"
        else:
            where = "one GPU each" if self.memory.device == "gpu" else "CPU processes, {} per node".format(
                self.per_node)
        replicas = ", {} replicas".format(self.plan.data_parallel.upper()) if layout.replicas > 1 else ""
        schedule = ", schedule {}".format(layout.schedule) if layout.stages > 1 else ""
        return ("Flan-T5 {}: {} stage(s) x {} replica(s) = {} process(es) on {}{}{}; micro-batch {} x {} "
                "micro-batch(es) x {} replica(s) = global batch {}{}".format(
                    layout.size.name, layout.stages, layout.replicas, layout.world_size, where, schedule,
                    replicas, layout.micro_batch_size, layout.micro_batches, layout.replicas,
                    layout.global_batch_size, "; peft adapters only (base frozen)" if self.plan.lora else ""))

    def table(self) -> str:
        """One row per rank, in GB, then the verdict against the memory there is."""
        gb = lambda n: "{:,.2f}".format(n / 1e9)  # noqa: E731
        header = ["rank", "stage", "replica", "blocks", "params (M)", "weights", "grads", "optimizer", "activations",
                  "training", "checkpoint", "export", "start-up", "peak GB"]
        layout = self.plan.layout
        # Under Interleaved1F1B a stage runs several model chunks: one run of blocks each.
        blocks = lambda stage: " | ".join(compact_blocks(layout.stage_blocks[c])  # noqa: E731
                                          for c in layout.chunks_of(stage))
        rows = [[str(r.rank), str(r.stage), str(r.replica), blocks(r.stage), "{:,.1f}".format(r.params / 1e6),
                 gb(r.weights), gb(r.gradients), gb(r.optimizer), gb(r.activations), gb(r.training), gb(r.checkpoint),
                 gb(r.export), gb(r.startup), gb(r.peak)] for r in self.plan.ranks]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) if i == 3 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(r, widths)))
        act = "bfloat16 autocast" if self.plan.activation_bytes == 2 else "float32"
        weights = "float32 weights" if self.plan.quantization == "none" else \
            "{} Linear weights (the rest float32)".format(self.plan.quantization)
        lines = [self.summary(),
                 "tokens: source {}, target {}; {}, float32 gradients and AdamW moments, activations in {}"
                 .format(self.plan.source_length, self.plan.target_length, weights, act),
                 line(header)] + [line(r) for r in rows]
        lines.append(self.verdict())
        if layout.stages > 1:
            lines.append("generation: {} micro-batches in flight per pipeline (validation.generation_micro_batches), "
                         "each stage computing {:.0%} of the time on paper (an encoder pass and {} positions per "
                         "micro-batch); their caches, up to {} GB on a rank, are in the peaks.".format(
                             self.plan.generation_micro_batches, self.plan.generation_utilisation,
                             self.plan.target_length, gb(max(r.generation for r in self.plan.ranks))))
        lines.append("On GPUs (one rank per GPU, bfloat16 autocast unless training.bf16=false): " + "; ".join(
            "{} {}".format(name, "fits" if ok else "does NOT fit") for name, _, ok in self.gpus) + ".")
        lines.append("start-up: host memory while each rank reads its own weights tensor by tensor (largest {} GB). "
                     "Estimates (ipu_t5/backends/torch_distributed/memory.py: training = weights + grads + optimizer "
                     "+ activations + the process's fixed cost); bench/memory.py measures them.".format(
                         gb(self.plan.startup_peak_bytes)))
        return "\n".join(lines)

    def verdict(self) -> str:
        gb = lambda n: "{:,.2f} GB".format(n / 1e9)  # noqa: E731
        if self.memory.device == "gpu":
            return "Largest rank {} against {}: {}.".format(gb(self.plan.largest_process_bytes), self.memory.what,
                                                           "fits" if self.fits else "does NOT fit")
        launcher = " and the launcher" if len(self.plan.ranks) > 1 else ""
        return "{} process(es){} on the fullest node at their peaks: {} of {}: {}.".format(
            self.per_node, launcher, gb(self.plan.node_sum_bytes(self.nodes)), self.memory.what,
            "fits" if self.fits else "does NOT fit")

    def refusal(self) -> str:
        """The one line `ipu-t5 train` ends with when the layout does not fit."""
        if self.memory.device == "gpu":
            worst = max(self.plan.ranks, key=lambda r: r.peak)
            need = "rank {} (stage {}) needs {:.1f} GB on a GPU of {}".format(
                worst.rank, worst.stage, worst.peak / 1e9, self.memory.what)
        else:
            need = "the node's processes need {:.1f} GB at their peaks and this host has {}".format(
                self.plan.node_sum_bytes(self.nodes) / 1e9, self.memory.what)
        return ("the layout does not fit in memory: {}. Use more stages or replicas (FSDP2 shards the optimizer: "
                "--set layout.data_parallel=fsdp), LoRA (--peft lora), a smaller global batch or micro-batch, or "
                "--ignore-memory-plan to try anyway.".format(need))

    def to_dict(self) -> Dict[str, Any]:
        layout = self.plan.layout
        return {
            "backend": "torch", "model": layout.size.name, "stages": layout.stages, "replicas": layout.replicas,
            "world_size": layout.world_size, "schedule": layout.schedule, "data_parallel": self.plan.data_parallel,
            "micro_batch_size": layout.micro_batch_size, "micro_batches": layout.micro_batches,
            "global_batch_size": layout.global_batch_size, "source_length": self.plan.source_length,
            "target_length": self.plan.target_length, "activation_bytes_per_value": self.plan.activation_bytes,
            "lora": self.plan.lora, "device": self.memory.device, "device_memory_bytes": self.memory.bytes,
            "device_memory": self.memory.what, "nodes": self.nodes, "processes_per_node": self.per_node,
            "launcher_bytes": LAUNCHER_BYTES if len(self.plan.ranks) > 1 else 0,
            "largest_peak_bytes": self.plan.largest_process_bytes, "node_peak_bytes": self.plan.node_sum_bytes(self.nodes),
            "startup_peak_bytes": self.plan.startup_peak_bytes, "fits": self.fits,
            "generation_micro_batches": self.plan.generation_micro_batches,
            "generation_utilisation": self.plan.generation_utilisation,
            "gpus": [{"name": name, "memory_bytes": memory, "fits": ok} for name, memory, ok in self.gpus],
            "ranks": [r.to_dict() for r in self.plan.ranks],
        }


def memory_report(config, source_length: int, target_length: int, device_memory: Optional[str] = None,
                  nodes: int = 1, layout: Optional[LayoutPlan] = None) -> MemoryReport:
    """The plan of `config`'s layout against this machine's memory (or `device_memory` per GPU)."""
    import psutil

    memory = available_memory(device_memory)
    # The export's reload check runs on the main process only where the model fits its host memory.
    host = psutil.virtual_memory().total
    plan = plan_memory(config, source_length, target_length, memory.device, layout, host_bytes=host)
    # The GPUs' verdicts for the cut the backend would take on GPUs, which may not be this machine's.
    gpus = tuple(gpu_fits(config, source_length, target_length, layout if memory.device == "gpu" else None))
    return MemoryReport(plan=plan, memory=memory, nodes=nodes, gpus=gpus)


def nodes_of(layout: LayoutPlan) -> int:
    """The nodes a launched layout runs on (torchrun's LOCAL_WORLD_SIZE processes each)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    return max(1, layout.world_size // max(1, local))


def check_layout_fits(config, layout: LayoutPlan, source_length: int, target_length: int) -> None:
    """Refuse, before any weight is read, a layout whose plan exceeds this machine's memory; the
    main process shows the table first. `layout.check_memory: false` (--ignore-memory-plan) skips it."""
    if not config.layout.check_memory:
        return
    report = memory_report(config, source_length, target_length, nodes=nodes_of(layout), layout=layout)
    if report.fits:
        return
    if os.environ.get("RANK", "0") == "0":
        print(report.table(), file=sys.stderr)
    raise UserError(report.refusal())


__all__: List[str] = ["GPUS", "MemoryReport", "available_memory", "check_layout_fits", "memory_report", "nodes_of",
                   "parse_bytes"]
