"""The torch.distributed backend's weights and AdamW state by Hugging Face name, so any layout writes
and reads the same names.

Checkpoints go through torch.distributed.checkpoint (`checkpoint_state`): every rank writes its own
stage's tensors (under FSDP2 its own shards) in parallel, a tensor that data-parallel replicas hold
alike is written once, and nothing is gathered. A one-process checkpoint is read by name, each rank
looking up only its own tensors and cutting them to the FSDP2 shard it holds. `model_state_dict` and
`optimizer_state_dict` still gather everything onto the main process, for callers that want the
whole model in memory (tests on small models); no checkpoint or export uses them."""
import collections
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.distributed as dist

from ... import quantization
from ...errors import UserError
from .topology import gather_tensors_to_main


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NamedState:
    """The state-by-name half of `TorchPipelineBackend` (its named parameters, optimizer, plan and
    topology).

    FSDP2 shards dim 0 of every parameter (and its optimizer state) over the replicas in
    torch.chunk's pieces. The shards are gathered and cut here over the replica group rather
    than with DTensor's collectives, which resolve groups through a mesh cache that keeps the
    groups of an earlier backend in the same process.
    """

    def _rows(self, tensor: torch.Tensor) -> Tuple[int, int]:
        """The dim-0 rows of every replica's FSDP2 shard of `tensor`, and where this one's start."""
        rows = -(-tensor.shape[0] // self.plan.replicas)
        return rows, min(self.topology.replica * rows, tensor.shape[0])

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of `tensor`: itself, or an FSDP2 DTensor's shards from this stage's replicas."""
        if not hasattr(tensor, "to_local"):
            return tensor
        local, (rows, _) = tensor.to_local(), self._rows(tensor)
        padded = local.new_zeros((rows,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.plan.replicas)]
        dist.all_gather(parts, padded, group=self.topology.replica_group)
        return torch.cat(parts)[:tensor.shape[0]]

    def _shard_like(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """`full` on this device, cut to this replica's shard when `param` is an FSDP2 DTensor."""
        full = full.to(self.device, param.dtype)
        if not hasattr(param, "to_local"):
            return full
        from torch.distributed.tensor import DTensor

        _, start = self._rows(param)
        shard = full[start:start + param.to_local().shape[0]].contiguous()
        return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def _float_weights(self) -> Mapping[str, torch.Tensor]:
        """A quantised base's stage (never FSDP2-sharded) by HF name, in float32: each bitsandbytes
        weight dequantised when looked up (`quantization.FloatWeights`), as one process exports it."""
        return collections.ChainMap(*(quantization.FloatWeights(chunk) for chunk in self.chunks.values()))

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        if quantization.enabled(self.config):
            local = dict(self._float_weights())
        else:
            local = {name: self._gather(p.detach()) for name, p in self.named}
        return gather_tensors_to_main(self.topology, local)

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        # Every trained weight must be there; frozen ones (a LoRA run's base, which its checkpoints
        # leave out) keep the values the run started from when absent.
        missing = [name for name, p in self.named if p.requires_grad and name not in state]
        if missing:
            raise UserError("the weights to load lack {} of this stage's parameters (first: {}): they are not "
                            "from this model size.".format(len(missing), missing[0]))
        with torch.no_grad():
            for name, param in self.named:
                if name in state:
                    local_shard(param).copy_(local_shard(self._shard_like(state[name], param)))

    def optimizer_state_dict(self) -> Dict:
        local = {}
        for name, param in self.named:
            for key, value in self.optimizer.state.get(param, {}).items():
                local["{}\0{}".format(name, key)] = self._gather(value) if torch.is_tensor(value) else torch.tensor(value)
        flat = gather_tensors_to_main(self.topology, local)
        state: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            name, field = key.split("\0")
            state.setdefault(name, {})[field] = value
        return state

    def load_optimizer_state_dict(self, state: Dict) -> None:
        for name, param in self.named:
            if name in state:
                self.optimizer.state[param] = {
                    k: (self._shard_like(v, param) if torch.is_tensor(v) and v.ndim else v)
                    for k, v in state[name].items()}

    def export_share(self) -> Mapping[str, torch.Tensor]:
        """Replica 0 of each stage writes the weights its stage owns (under FSDP2 gathered from the
        stage's replicas one tensor at a time, the other replicas keeping none); the others write none.
        A quantised base's weights go out in float32."""
        if quantization.enabled(self.config):
            return self._float_weights() if self.topology.replica == 0 else {}
        share = {}
        for name, param in self.named:
            whole = self._gather(param.detach())
            if self.topology.replica == 0:
                share[name] = whole
        return share

    def _adam_state(self, param: torch.Tensor) -> Dict[str, torch.Tensor]:
        """AdamW's state of `param`, created as AdamW creates it before its first step when there is
        none yet (a load needs the tensors to fill)."""
        state = self.optimizer.state[param]
        if not state:
            fused = bool(self.optimizer.defaults.get("fused"))
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def checkpoint_state(self) -> Dict[str, Dict[str, Any]]:
        """This rank's weights and AdamW state by HF name, as live tensors (FSDP2 DTensors stay
        sharded) that torch.distributed.checkpoint writes from, or reads into, in place."""
        model = {name: param.detach() for name, param in self.named}
        optimizer = {name: dict(self._adam_state(param)) for name, param in self.named if param.requires_grad}
        return {"model": model, "optimizer": optimizer}

    def load_checkpoint_state(self, state: Dict[str, Dict[str, Any]]) -> None:
        """Nothing left to do: torch.distributed.checkpoint filled the live tensors in place."""
