"""The torch.distributed backend: the layout's stages as a `torch.distributed.pipelining` pipeline
(GPipe, 1F1B or Interleaved1F1B), its replicas under DDP or FSDP2, one process per stage and
replica, launched by torchrun.

Gradients are those of one process on the whole global batch: the loss is `token_loss` (summed
cross-entropy over the global batch's target-token count), the schedules do not rescale
(`scale_grads=False`) and the replicas sum rather than average, so every split of the batch gives
the same step. Clipping uses the norm over all stages, and every method returns the same result
on every rank, except `model_state_dict` and `optimizer_state_dict`, which gather the whole model
on the main process only (an 11B model does not fit on every rank) and return an empty dict
elsewhere.

Needs torch 2.6 or newer; `torch.distributed.pipelining` and FSDP2 are imported only here.
"""
import collections
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

from ...data.batching import GlobalBatch, collate
from ...errors import UserError
from ...layout import check_pipeline_fill
from ...model_source import ModelSource
from ...prompt_tuning import virtual_tokens
from ... import quantization
from ..base import Backend, StepResult, all_finite, update_is_finite
from ..fast_ops import use_fast_ops
from ..host_memory import keep_heap_small, return_freed_memory
from ..optim import build_optimizer, lr_at, set_lr, token_loss
from ..precision import autocast_dtype, eval_autocast_dtype, precision_phrase
from ..single import refuse_fp16
from .generation import PipelineGeneration
from .stages import build_chunks, carried_shapes
from .state import NamedState, local_shard
from .topology import Topology, broadcast_object, connect

MIN_TORCH = (2, 6)
# Training pads the source to a multiple of this, so few distinct shapes (each needs its own
# pipeline buffers) occur over a run.
SOURCE_BUCKET = 8
# Pipelines kept for recent (source, target) shapes.
CACHED_SHAPES = 8


def _require_torch() -> None:
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise UserError("the torch.distributed backend needs torch {}.{} or newer (found {}); on the Poplar SDK "
                        "stack use --backend ipu, or --backend single for one process.".format(
                            MIN_TORCH[0], MIN_TORCH[1], torch.__version__))


def _sum_over(group):
    """A DDP communication hook that sums the replicas' gradients instead of averaging them:
    each replica's loss is already its share of the global mean."""
    def hook(_state, bucket):
        work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    return hook


class TorchPipelineBackend(PipelineGeneration, NamedState, Backend):
    """Pipeline stages x data-parallel replicas on torch.distributed (gloo on CPU, NCCL on GPUs)."""

    name = "torch"

    @classmethod
    def layout_plan(cls, config, lengths, size=None):
        from ..batch_search import fitted_plan
        from .memory import lightest_cut
        from .memory_report import available_memory

        # The device the memory check will compare with (the same rule for GPUs or host RAM).
        device = available_memory().device
        return fitted_plan(config, lengths.source, lengths.target,
                           lambda c: lightest_cut(c, lengths.source, lengths.target, device, size))

    @classmethod
    def check_memory(cls, config, plan, lengths):
        from .memory_report import check_layout_fits

        check_layout_fits(config, plan, lengths.source, lengths.target)

    def __init__(self, config, plan):
        super().__init__(config, plan)
        # Before any weight. A rank's host memory is its share of the node's (and on CPU processes
        # its device memory): the blocks a step frees, FSDP2's gathered units among them, go back
        # at once. One process keeps glibc's defaults, faster on a CPU (a base-shaped step 4.8 s
        # against 5.5 s with the setting) where memory is not split.
        keep_heap_small()
        check_pipeline_fill(plan)  # the layout relaxes it for phased IPU execution only
        _require_torch()
        refuse_fp16(config.training)
        quantization.require(config)
        if quantization.enabled(config) and plan.replicas > 1 and config.layout.data_parallel == "fsdp":
            # FSDP2 shards parameters as plain tensors: bitsandbytes' packed weights and their block
            # scales (held beside them, not as parameters) do not survive the cut.
            raise UserError("model.quantization={} does not shard under FSDP2: use layout.data_parallel=ddp "
                            "(the quantised base is small), or model.quantization=none.".format(
                                config.model.quantization))
        self.topology: Topology = connect(plan, config.layout.ddp_timeout)
        self.device = self.topology.device
        self.amp_dtype = autocast_dtype(config.training.bf16, self.device)
        self.eval_amp_dtype = eval_autocast_dtype(config.validation.bf16, self.amp_dtype)
        self.chunk_ids = plan.chunks_of(self.topology.stage)
        self.num_chunks = len(plan.stage_blocks)
        self._pipelines: "collections.OrderedDict[Tuple[int, int], Any]" = collections.OrderedDict()
        self._num_tokens = 1

    # ----- the interface -----

    @property
    def is_main_process(self) -> bool:
        return self.topology.is_main

    @property
    def description(self) -> str:
        where = "GPU" if self.device.type == "cuda" else "CPU"
        return "torch.distributed: {} stage(s) x {} replica(s) on {} {} process(es) ({}), schedule {}, {}, {}".format(
            self.plan.stages, self.plan.replicas, self.topology.world_size, where,
            "nccl" if self.device.type == "cuda" else "gloo", self.plan.schedule,
            self.config.layout.data_parallel.upper() if self.plan.replicas > 1 else "no data parallelism",
            precision_phrase(self.amp_dtype, self.eval_amp_dtype, self.config.training.bf16, self.device))

    def setup(self, model) -> None:
        source = ModelSource.of(model)
        # The whole model on the meta device: its parts are cut into this rank's chunks, and only
        # those are materialised on this rank's device, their weights read or drawn by name.
        frame = source.meta_model(quantised=True)
        use_fast_ops(frame)
        hf = frame.config
        self.pad_id, self.eos_id, self.start_id = hf.pad_token_id, hf.eos_token_id, hf.decoder_start_token_id
        self.d_model, self.heads, self.vocab, self.num_layers = hf.d_model, hf.num_heads, hf.vocab_size, hf.num_layers
        chunks = build_chunks(frame, [self.plan.stage_blocks[c] for c in self.chunk_ids], self.amp_dtype,
                              self.eval_amp_dtype)
        self.chunks = {c: source.materialise(chunk, self.device) for c, chunk in zip(self.chunk_ids, chunks)}
        self.modules = {c: self._data_parallel(chunk) for c, chunk in self.chunks.items()}
        # Parameters by HF name; FSDP2 replaces them, so they are looked up after wrapping.
        # Each name is held by one chunk (the shared embedding by the embedding's chunk only).
        self.named = [(name, p) for c in self.chunk_ids for name, p in self.chunks[c].named_parameters()]
        self.optimizer = build_optimizer(self.named, self.config.training)

    def _data_parallel(self, chunk: torch.nn.Module) -> torch.nn.Module:
        # A chunk with nothing to train (LoRA adapting layers elsewhere) has no gradients to
        # reduce, and DDP refuses such a module; FSDP2 still shards its frozen weights.
        trains = any(p.requires_grad for p in chunk.parameters())
        if self.plan.replicas == 1 or (not trains and self.config.layout.data_parallel != "fsdp"):
            return chunk
        group = self.topology.replica_group
        if self.config.layout.data_parallel == "fsdp":
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import DTensor

            mesh = DeviceMesh.from_group(group, self.device.type)
            # Resharding after forward: every block its own unit, and the chunk itself none. The
            # pipeline stage keeps an FSDP2 chunk's weights and gradients whole until the step's
            # last micro-batch; units below a plain chunk gather and free their weights around each
            # call and reduce-scatter their gradients after each micro-batch, so a stage holds its
            # shards and one or two whole blocks. Otherwise the chunk is one unit (more memory, one
            # reduce-scatter a step).
            units = chunk.sharding_units() if self.config.layout.fsdp_reshard_after_forward else [chunk]
            for unit in units:
                fully_shard(unit, mesh=mesh, reshard_after_forward=self.config.layout.fsdp_reshard_after_forward)
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
            unsharded = [name for name, p in chunk.named_parameters() if not isinstance(p, DTensor)]
            if unsharded:
                raise RuntimeError("FSDP2 left parameters of a chunk unsharded: {}".format(", ".join(unsharded[:5])))
            return chunk
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(chunk, process_group=group,
                                          device_ids=[self.device] if self.device.type == "cuda" else None)
        wrapped.register_comm_hook(None, _sum_over(group))
        return wrapped

    # ----- training -----

    def _stage_of_chunk(self, chunk: int) -> int:
        return chunk % self.plan.stages

    def _meta(self, kind: str, source: int, target: int) -> Tuple[torch.Tensor, ...]:
        shapes = carried_shapes(kind, self.plan.micro_batch_size, source, target, self.d_model, self.heads, self.vocab,
                                virtual_tokens(self.config))
        metas = []
        for name, (shape, dtype, grad) in shapes.items():
            if name == "logits" and self.amp_dtype is not None:
                dtype = self.amp_dtype
            metas.append(torch.empty(shape, dtype=dtype, device="meta").requires_grad_(grad))
        return tuple(metas)

    def _pipeline(self, source: int, target: int):
        """The schedule for one (source, target) padded shape, built on first use."""
        key = (source, target)
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        from torch.distributed import pipelining

        stages = [pipelining.PipelineStage(
            self.modules[c], c, self.num_chunks, self.device,
            input_args=self._meta(self.chunks[c].start, source, target),
            output_args=self._meta(self.chunks[c].end, source, target),
            group=self.topology.pipeline_group) for c in self.chunk_ids]
        cls = {"GPipe": pipelining.ScheduleGPipe, "1F1B": pipelining.Schedule1F1B,
               "Interleaved1F1B": pipelining.ScheduleInterleaved1F1B}[self.plan.schedule]
        schedule = cls(stages if self.plan.chunks_per_stage > 1 else stages[0], n_microbatches=self.plan.micro_batches,
                       loss_fn=self._loss, scale_grads=False)
        self._pipelines[key] = schedule
        if len(self._pipelines) > CACHED_SHAPES:
            self._pipelines.popitem(last=False)
        return schedule

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, labels, self._num_tokens)

    def train_step(self, batch: GlobalBatch, step: int) -> StepResult:
        for module in self.modules.values():
            module.train()
        self.optimizer.zero_grad(set_to_none=True)
        mine = [s for micro in self.plan.split(batch.samples)[self.topology.replica] for s in micro]
        width = max(len(s["input_ids"]) for s in mine)
        tensors = collate(mine, self.pad_id, source_length=-(-width // SOURCE_BUCKET) * SOURCE_BUCKET)
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        schedule = self._pipeline(tensors["input_ids"].shape[1], tensors["labels"].shape[1])
        self._num_tokens = batch.num_target_tokens
        first, last = 0 in self.chunks, self.num_chunks - 1 in self.chunks
        losses: List[torch.Tensor] = []
        inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["decoder_input_ids"]) if first else ()
        schedule.step(*inputs, target=tensors["labels"] if last else None, losses=losses if last else None,
                      return_outputs=False)
        stats = torch.stack([sum(l.detach().float() for l in losses) if losses else torch.zeros((), device=self.device),
                             self._squared_grad_norm()])
        dist.all_reduce(stats)
        loss, grad_norm = stats[0].item(), stats[1].sqrt()
        lr = lr_at(step, self.config.training)
        # The loss and the norm were all-reduced, so every rank skips the same steps.
        finite = update_is_finite(stats[0], grad_norm)
        if finite:
            coefficient = torch.clamp(self.config.training.max_grad_norm / (grad_norm + 1e-6), max=1.0)
            for _, param in self.named:
                if param.grad is not None:
                    param.grad.mul_(coefficient)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        # Gradients exist only within a step: checkpoints, exports and validation run without them,
        # and a skipped step leaves none behind.
        self.optimizer.zero_grad(set_to_none=True)
        return_freed_memory()
        return StepResult(loss=loss, grad_norm=grad_norm.item(), lr=lr, skipped=not finite)

    def _squared_grad_norm(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm: each parameter counted once
        (DDP replicas hold equal gradients, FSDP2 shards are disjoint)."""
        total = torch.zeros((), device=self.device)
        if self.plan.replicas > 1 and self.config.layout.data_parallel == "ddp" and self.topology.replica != 0:
            return total
        for _, param in self.named:
            if param.grad is not None:
                total += local_shard(param.grad).detach().float().pow(2).sum()
        return total

    def weights_finite(self) -> bool:
        # Each rank checks its own parameters (FSDP2: its shards), without gathering any. A quantised
        # base's packed codes are bytes, not numbers, and frozen: there only what trains is checked.
        frozen_codes = quantization.enabled(self.config)
        mine = all_finite(local_shard(p.detach()) for _, p in self.named if p.requires_grad or not frozen_codes)
        return all(self.gather_object(mine))

    def release_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def release_model(self) -> None:
        # The schedules hold the stages, the stages the modules: every reference goes.
        self._pipelines.clear()
        self.chunks, self.modules, self.named, self.optimizer = {}, {}, [], None

    # ----- processes -----

    @property
    def process_index(self) -> int:
        return self.topology.rank

    @property
    def num_processes(self) -> int:
        return self.topology.world_size

    def broadcast_object(self, obj):
        return broadcast_object(obj)

    def gather_object(self, obj) -> List[Any]:
        gathered: List[Any] = [None] * self.topology.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        self._pipelines.clear()
        self.topology.close()
