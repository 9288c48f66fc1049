"""Process groups for the pipeline backend: torchrun's environment, a 2-D mesh of pipeline stages x
data-parallel replicas, gloo on CPU and NCCL on GPUs, and a timeout on every collective.

Global rank = stage * replicas + replica: the replicas of one stage are neighbours, so on GPU nodes
the gradient all-reduce (the heaviest traffic) stays inside a node while activations cross nodes.
"""
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from ...layout import LayoutPlan
from .launch import launched_by_torchrun, restart_count


@dataclass
class Topology:
    """Where this process sits in the layout and the groups it talks over."""

    rank: int
    world_size: int
    stage: int
    replica: int
    device: torch.device
    # This replica's pipeline (one rank per stage) and this stage's replicas.
    pipeline_group: Any
    replica_group: Any
    # Global ranks of this replica's pipeline, by stage.
    pipeline_ranks: List[int]
    owns_default_group: bool = False
    groups: List[Any] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_of_stage(self, stage: int) -> int:
        return self.pipeline_ranks[stage]

    def close(self) -> None:
        """Destroy the groups this topology created (and the default group if it created it)."""
        if not dist.is_initialized():
            return
        for group in self.groups:
            dist.destroy_process_group(group)
        if self.owns_default_group:
            dist.destroy_process_group()


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def connect(plan: LayoutPlan, timeout_seconds: int) -> Topology:
    """Join (or, for a single process, create) the default process group, check that it has the
    plan's stages x replicas processes, and build the pipeline and replica groups."""
    device = _device()
    timeout = datetime.timedelta(seconds=timeout_seconds)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend, timeout=timeout, **_restarted_store(timeout))
        else:
            plan.check_world_size(1)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    plan.check_world_size(dist.get_world_size())
    rank, replicas = dist.get_rank(), plan.replicas
    stage, replica = divmod(rank, replicas)
    groups: List[Any] = []

    def group(ranks: List[int]):
        made = dist.new_group(ranks, timeout=timeout)
        groups.append(made)
        return made

    pipeline_group = replica_group = None
    for r in range(replicas):
        made = group([s * replicas + r for s in range(plan.stages)])
        if r == replica:
            pipeline_group = made
    for s in range(plan.stages):
        made = group([s * replicas + r for r in range(replicas)])
        if s == stage:
            replica_group = made
    return Topology(rank=rank, world_size=dist.get_world_size(), stage=stage, replica=replica, device=device,
                    pipeline_group=pipeline_group, replica_group=replica_group,
                    pipeline_ranks=[s * replicas + replica for s in range(plan.stages)],
                    owns_default_group=owns, groups=groups)


def _restarted_store(timeout: datetime.timedelta) -> Dict[str, Any]:
    """init_process_group's store for a restarted worker whose store is its agent's (a static
    rendezvous always): the agent's store under a prefix of this attempt, so that no rank reads
    an address its peer had in the failed attempt (pytorch/pytorch#135712). Nothing otherwise."""
    restart = restart_count()
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return {}
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore("ipu-t5/attempt_{}".format(restart), store),
            "rank": int(os.environ["RANK"]), "world_size": world}


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`obj` from global rank `src` on every rank of `group` (default: all)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def gather_tensors_to_main(topology: Topology, local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every stage's tensors, by name, on global rank 0 (an empty dict elsewhere).

    Replica 0 of each stage ships its tensors to rank 0 one at a time, so rank 0 holds the whole
    model in CPU memory but no other rank does.
    """
    result: Dict[str, torch.Tensor] = {}
    for stage in range(len(topology.pipeline_ranks)):
        # The stage's sender in replica 0: stage * replicas.
        source = stage * (topology.world_size // len(topology.pipeline_ranks))
        if source == 0:
            if topology.is_main:
                result.update({k: v.detach().cpu().clone() for k, v in local.items()})
            continue
        if topology.rank == source:
            meta = [(k, tuple(v.shape), v.dtype) for k, v in local.items()]
            dist.send_object_list([meta], dst=0, device=topology.device)
            for _, tensor in local.items():
                dist.send(tensor.detach().to(topology.device).contiguous(), dst=0)
        elif topology.is_main:
            holder: List[Any] = [None]
            dist.recv_object_list(holder, src=source, device=topology.device)
            for name, shape, dtype in holder[0]:
                buffer = torch.empty(shape, dtype=dtype, device=topology.device)
                dist.recv(buffer, src=source)
                result[name] = buffer.cpu()
    return result
