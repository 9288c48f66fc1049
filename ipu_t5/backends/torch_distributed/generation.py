"""Greedy generation through the pipeline: each replica decodes its micro-batches of a call's
prompts as a wavefront (`wavefront.py`), several micro-batches in flight so that every stage has
work, each with its own key/value caches; the last stage's tokens reach every rank of its pipeline
as it picks them. No process holds the whole model."""
import contextlib
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ...data.batching import collate
from ...prompt_tuning import virtual_tokens
from ..base import trim_at_eos
from .generation_plan import micro_batch_rows, slots, window_rows
from .stages import autocast_region
from .wavefront import MicroBatch, Wavefront


class PipelineGeneration:
    """The generation half of `TorchPipelineBackend` (its chunks, plan and topology)."""

    @contextlib.contextmanager
    def _unsharded(self):
        """FSDP2 parameters gathered for the generation calls that bypass `forward` (every unit: the
        chunk, or each of its blocks, norms, embedding and head)."""
        sharded = [m for chunk in self.chunks.values() for m in chunk.modules() if hasattr(m, "unshard")]
        for module in sharded:
            module.unshard()
            # Kept whole through every call: a unit resharded after each micro-batch's call would
            # gather again, a collective the replicas (with different micro-batch counts) cannot match.
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                module.set_reshard_after_forward(self.config.layout.fsdp_reshard_after_forward, recurse=False)
                module.reshard()

    @property
    def generation_slots(self) -> int:
        """Micro-batches in flight per pipeline (`generation_plan.slots`)."""
        return slots(self.config.validation.generation_micro_batches, self.plan.stages)

    def generation_window(self, batch_size: int) -> int:
        return window_rows(batch_size, self.plan.stages, self.plan.replicas)

    @torch.no_grad()
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        """The prompts cut into micro-batches in order (similar lengths together), dealt to the
        replicas in turn; each replica's pipeline decodes its own as one wavefront."""
        for chunk in self.chunks.values():
            chunk.eval()
        replicas, replica = self.plan.replicas, self.topology.replica
        rows = micro_batch_rows(len(samples), replicas, self.generation_slots, self.plan.stages)
        cuts = [samples[i:i + rows] for i in range(0, len(samples), rows)]
        mine = {}
        if max_new_tokens > 0:
            micro = []
            for index in range(replica, len(cuts), replicas):
                tensors = collate(cuts[index], self.pad_id)
                micro.append(MicroBatch(index, tensors["input_ids"].to(self.device),
                                        tensors["attention_mask"].to(self.device), virtual_tokens(self.config)))
            # One autocast region around the whole call: each chunk's own (nested) regions then reuse
            # autocast's bfloat16 copies of the weights instead of casting every weight again for every
            # micro-batch at every position (the LM head alone is 16M values on flan-t5-small).
            with self._unsharded(), autocast_region(self.device.type, self.eval_amp_dtype):
                Wavefront(self, micro, self.generation_slots, max_new_tokens).run()
            last_stage = self._stage_of_chunk(self.num_chunks - 1)
            if self.topology.stage == last_stage:
                mine = {m.index: [trim_at_eos(row, self.eos_id) for row in torch.stack(m.tokens, 1).tolist()]
                        for m in micro}
        gathered: List[Optional[Dict[int, List[List[int]]]]] = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine)
        found = {index: ids for part in gathered for index, ids in (part or {}).items()}
        if max_new_tokens <= 0:
            return [[] for _ in samples]
        return [ids for index in range(len(cuts)) for ids in found[index]]
