"""`training.auto_find_batch_size` (Hugging Face's name): the largest micro-batch the memory plan
fits, picked before any weight is read.

Hugging Face's Trainer finds it by retrying after each out-of-memory error; here the memory plan
(`torch_distributed/memory.py`, pure arithmetic) answers for every candidate at once. The global
batch is kept: micro-batch x micro-batches x replicas = `training.global_batch_size`, so the
candidates are the divisors of each replica's share, and gradient accumulation makes up the rest.
Backends with a host-side memory plan (single, torch) use it; the IPU's planner picks its own
micro-batch from its SRAM plan.
"""
import copy
import os
import sys
from typing import Callable, List, Optional

from ..errors import UserError
from ..layout import LayoutPlan


def micro_batch_candidates(global_batch: int, replicas: int) -> List[int]:
    """Micro-batch sizes that keep the global batch, largest first: the divisors of each replica's
    share (a global batch that does not split over the replicas has none)."""
    if global_batch % replicas:
        return []
    share = global_batch // replicas
    return [m for m in range(share, 0, -1) if share % m == 0]


def with_micro_batch(config, micro_batch_size: int):
    """A copy of `config` whose layout asks for `micro_batch_size` (accumulation following)."""
    trial = copy.deepcopy(config)
    trial.layout.micro_batch_size = micro_batch_size
    trial.layout.gradient_accumulation_steps = None
    return trial


def fitted_plan(config, source_length: int, target_length: int,
                plan_for: Callable[[object], LayoutPlan], device_memory: Optional[str] = None) -> LayoutPlan:
    """`plan_for(config)`, or with `training.auto_find_batch_size` the plan of the largest
    micro-batch whose memory plan fits this machine (printed with its table on the main process);
    a UserError when not even a micro-batch of 1 fits. `plan_for` builds the backend's layout plan
    for a config (its own cut); `device_memory`: memory per GPU instead of this machine's (`ipu-t5 plan
    --device-memory`)."""
    if not config.training.auto_find_batch_size:
        return plan_for(config)
    from .torch_distributed.memory_report import memory_report, nodes_of

    refused, tried = None, []
    for micro in micro_batch_candidates(config.training.global_batch_size, config.layout.replicas):
        trial = with_micro_batch(config, micro)
        try:
            layout = plan_for(trial)
        except UserError:  # too few micro-batches to fill the pipeline: a smaller one may do
            continue
        report = memory_report(trial, source_length, target_length, device_memory, nodes_of(layout), layout)
        tried.append(micro)
        if report.fits:
            if os.environ.get("RANK", "0") == "0":
                print("{}\ntraining.auto_find_batch_size: micro-batch {} x {} micro-batch(es) x {} replica(s) = "
                      "global batch {}, the largest the memory plan fits ({}).".format(
                          report.table(), layout.micro_batch_size, layout.micro_batches, layout.replicas,
                          layout.global_batch_size, report.verdict().rstrip(".")), file=sys.stderr)
            return layout
        refused = report
    if refused is None:
        raise UserError("training.auto_find_batch_size: no micro-batch splits the global batch {} over {} replica(s) "
                        "into enough micro-batches for {} stage(s): raise training.global_batch_size.".format(
                            config.training.global_batch_size, config.layout.replicas, config.layout.stages))
    raise UserError("training.auto_find_batch_size: not even micro-batch {}: {}".format(tried[-1], refused.refusal()))
