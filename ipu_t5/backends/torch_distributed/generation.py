"""Greedy generation through the pipeline: each replica decodes its share of a batch, the encoder
part once, then one position at a time through every decoder stage, with a key/value cache in each
chunk; the last stage's tokens are broadcast back to the first. No process holds the whole model."""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ...data.batching import collate
from ...prompt_tuning import extend_mask, virtual_tokens
from ..base import trim_at_eos
from .stages import ENCODER, boundary_kind


class PipelineGeneration:
    """The generation half of `TorchPipelineBackend` (its chunks, plan and topology)."""

    def _send(self, tensors: List[torch.Tensor], chunk: int) -> None:
        rank = self.topology.rank_of_stage(self._stage_of_chunk(chunk))
        for tensor in tensors:
            dist.send(tensor.contiguous(), dst=rank, group=self.topology.pipeline_group)

    def _recv(self, shapes: List[Tuple[int, ...]], chunk: int) -> List[torch.Tensor]:
        rank = self.topology.rank_of_stage(self._stage_of_chunk(chunk))
        out = []
        for shape in shapes:
            buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.recv(buffer, src=rank, group=self.topology.pipeline_group)
            out.append(buffer)
        return out

    @contextlib.contextmanager
    def _unsharded(self):
        """FSDP2 parameters gathered for the generation calls that bypass `forward` (every unit: the
        chunk, or each of its blocks, norms, embedding and head)."""
        sharded = [m for chunk in self.chunks.values() for m in chunk.modules() if hasattr(m, "unshard")]
        for module in sharded:
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()

    @torch.no_grad()
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        for chunk in self.chunks.values():
            chunk.eval()
        replicas = self.plan.replicas
        per = -(-len(samples) // replicas)
        share = samples[self.topology.replica * per:(self.topology.replica + 1) * per]
        with self._unsharded():
            mine = self._generate_share(share, max_new_tokens) if share else []
        last_rank = self.topology.rank_of_stage(self._stage_of_chunk(self.num_chunks - 1))
        gathered: List[Optional[List[List[int]]]] = [None] * self.topology.world_size
        dist.all_gather_object(gathered, mine if self.topology.rank == last_rank else None)
        last_stage = self._stage_of_chunk(self.num_chunks - 1)
        return [ids for r in range(replicas) for ids in gathered[last_stage * replicas + r]]

    def _generate_share(self, share: List[Dict], max_new_tokens: int) -> List[List[int]]:
        """Greedy decoding of one replica's samples through its pipeline, with a cache per chunk."""
        tensors = collate(share, self.pad_id)
        ids, source_mask = tensors["input_ids"].to(self.device), tensors["attention_mask"].to(self.device)
        # Past the embedding's chunk (which prepends it itself) the encoder holds a soft prompt too.
        mask = extend_mask(source_mask, virtual_tokens(self.config))
        batch, width = mask.shape
        carried: Dict[str, torch.Tensor] = {"input_ids": ids}
        for c in range(self.num_chunks):
            if c not in self.chunks:
                continue
            chunk = self.chunks[c]
            if c > 0 and c - 1 not in self.chunks:
                if boundary_kind(self.plan.stage_blocks[c - 1], self.num_layers) == ENCODER:
                    hidden, bias = self._recv([(batch, width, self.d_model), (1, self.heads, width, width)], c - 1)
                    carried = {"hidden": hidden, "encoder_bias": bias}
                else:
                    carried = {"encoder_output": self._recv([(batch, width, self.d_model)], c - 1)[0]}
            carried = chunk.encode(dict(carried, attention_mask=source_mask if chunk.embeds_input else mask))
            if chunk.decoder_ids:
                chunk.start_decoding(carried["encoder_output"], mask)
            if c + 1 < self.num_chunks and c + 1 not in self.chunks:
                self._send(list(carried.values()), c + 1)
        decoder_chunks = [c for c in range(self.num_chunks) if any(
            b.startswith("decoder.") or b == "lm_head" for b in self.plan.stage_blocks[c])]
        last = self.num_chunks - 1
        last_rank = self.topology.rank_of_stage(self._stage_of_chunk(last))
        tokens = torch.full((batch, 1), self.start_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generated = []
        # Every pipeline rank has each position's tokens; the embedding's chunk (0) embeds them for
        # the chunk with `decoder.0`, sending them over when another rank holds that chunk.
        first = decoder_chunks[0]
        for position in range(max_new_tokens):
            hidden = bias = None
            if 0 in self.chunks:
                hidden = self.chunks[0].embed_tokens(tokens)
                if first not in self.chunks:
                    self._send([hidden], first)
            elif first in self.chunks:
                hidden = self._recv([(batch, 1, self.d_model)], 0)[0]
            for c in decoder_chunks:
                if c not in self.chunks:
                    continue
                if c != first and c - 1 not in self.chunks:
                    hidden, bias = self._recv([(batch, 1, self.d_model), (1, self.heads, 1, position + 1)], c - 1)
                out = self.chunks[c].decode_step(position, hidden, decoder_bias=bias)
                if c == last:
                    logits = out
                else:
                    hidden, bias = out
                    if c + 1 not in self.chunks:
                        self._send([hidden, bias], c + 1)
            message = torch.zeros(batch + 1, dtype=torch.long, device=self.device)
            if last in self.chunks:
                step_tokens = torch.where(finished, torch.full_like(finished, self.pad_id, dtype=torch.long),
                                          logits.argmax(-1))
                finished |= step_tokens == self.eos_id
                message[:batch], message[batch] = step_tokens, int(bool(finished.all()))
            if self.plan.stages > 1:
                dist.broadcast(message, src=last_rank, group=self.topology.pipeline_group)
            tokens = message[:batch, None]
            generated.append(message[:batch])
            if message[batch]:
                break
        for chunk in self.chunks.values():
            if chunk.decoder_ids:
                chunk.end_decoding()
        rows = torch.stack(generated, dim=1).tolist()
        return [trim_at_eos(row, self.eos_id) for row in rows]
