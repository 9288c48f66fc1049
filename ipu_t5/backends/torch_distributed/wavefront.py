"""Greedy decoding of a stream of micro-batches through the pipeline, every stage busy.

K slots (`generation_plan.slots`) each hold one micro-batch at a time. In every tick each slot takes
one step: its micro-batch's encoder pass when it has just been admitted, else one decoding position
(the embedding's chunk embeds the previous tokens, the decoder chunks follow in order, the last one
picks the tokens and reports them to every other rank). A micro-batch leaves its slot when all its
rows have ended or the position cap is reached, and the next micro-batch of the stream enters.

Each rank walks the same order, (tick, round, slot), doing the part of each step that its chunk of
that round holds (chunk = round x stages + stage). Every step depends only on steps earlier in that
order, so with blocking receives and asynchronous sends no rank can wait for one that waits for it;
and while the last stage works on slot k, the first already works on slot k + 1: with K >= stages
slots there is always work for each stage (a GPipe forward that never drains between positions).
The slots start staggered over a micro-batch's lifetime, so encoder passes (the first stages' work)
spread over the ticks instead of all arriving at once.

Where the first stage holds only encoder blocks (a contiguous cut), its encoder passes need nothing
from the other stages: it runs them ahead, for the next micro-batches of the stream, while it would
otherwise wait for a position's tokens, and sends their outputs tagged with the micro-batch's
place in the stream, so that the next stage takes them when that micro-batch enters a slot,
whatever else it received meanwhile. Without it the next stage waits at every admission for an
encoder pass begun only then.

Each micro-batch keeps its own caches (`StageChunk.start_decoding` returns them) until it leaves.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ...prompt_tuning import extend_mask
from .generation_plan import RUN_AHEAD, encoder_runs_ahead
from .stages import ENCODER, boundary_kind


class MicroBatch:
    """One micro-batch's prompts, and what decoding it has produced so far."""

    def __init__(self, index: int, ids: torch.Tensor, mask: torch.Tensor, virtual_tokens: int = 0):
        # Past the embedding's chunk (which prepends it itself) the encoder holds a soft prompt too.
        self.index, self.ids, self.source_mask = index, ids, mask
        self.mask = extend_mask(mask, virtual_tokens)
        self.rows, self.width = self.mask.shape
        self.tokens: List[torch.Tensor] = []
        # Its place in the stream, and the sends of its encoder pass where the first stage ran it
        # ahead of its admission.
        self.seq = 0
        self.ahead: Optional[List[Tuple[object, torch.Tensor]]] = None
        # Set by the last stage (finished rows) and by every rank from its reports (`done`).
        self.finished: Optional[torch.Tensor] = None
        self.done = False

    @property
    def tag(self) -> int:
        """The tag of its first chunk's encoder messages (0 is every other message's)."""
        return 1 + self.seq


class Slot:
    """A place in the wavefront: its micro-batch, the step it takes next (-1: the encoder pass,
    p >= 0: decoding position p) and each local chunk's caches for it."""

    def __init__(self, start_tick: int):
        self.start_tick = start_tick
        self.micro: Optional[MicroBatch] = None
        self.step = -1
        self.caches: Dict[int, object] = {}
        self.carried: Dict[str, torch.Tensor] = {}


class Wavefront:
    """One rank's part of decoding `micro_batches` (its replica's) through `backend`'s chunks."""

    def __init__(self, backend, micro_batches: Sequence[MicroBatch], slots: int, max_new_tokens: int):
        self.b = backend
        plan = backend.plan
        self.stages, self.rounds = plan.stages, plan.chunks_per_stage
        self.stage = backend.topology.stage
        self.num_chunks = backend.num_chunks
        self.last = self.num_chunks - 1
        self.decoder_chunks = [c for c in range(self.num_chunks) if any(
            b.startswith("decoder.") or b == "lm_head" for b in plan.stage_blocks[c])]
        self.first_decoder = self.decoder_chunks[0]
        self.max_new_tokens = max_new_tokens
        self.queue = list(micro_batches)
        for seq, micro in enumerate(self.queue):
            micro.seq = seq
        self.next_micro = 0
        # The first stage's encoder passes run ahead where its chunk holds no decoder block (every
        # rank decides alike, from the plan).
        self.tagged = encoder_runs_ahead(plan)
        self.runs_ahead = self.tagged and self.stage == 0
        # Staggered over the longest lifetime (an encoder pass and every position).
        lifetime = max_new_tokens + 1
        self.slots = [Slot(k * lifetime // slots) for k in range(slots)]
        self.pending: List[Tuple[object, torch.Tensor]] = []

    # ----- messages -----

    def _rank(self, chunk: int) -> int:
        return self.b.topology.rank_of_stage(chunk % self.stages)

    def _local(self, chunk: int) -> bool:
        return chunk % self.stages == self.stage

    def _send(self, tensors: List[torch.Tensor], rank: int, tag: int = 0) -> List[Tuple[object, torch.Tensor]]:
        sent = []
        for tensor in tensors:
            tensor = tensor.contiguous()
            # Kept until sent: the buffer must outlive the asynchronous send.
            sent.append((dist.isend(tensor, dst=rank, group=self.b.topology.pipeline_group, tag=tag), tensor))
        if not tag:
            self._pending(sent)
        return sent

    def _pending(self, sent: List[Tuple[object, torch.Tensor]]) -> None:
        # Waited for in the order the receivers take them (an encoder pass run ahead joins at its
        # micro-batch's admission, where its receiver takes it).
        self.pending.extend(sent)
        if len(self.pending) > 64:
            self._flush(keep=16)

    def _flush(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            work, _ = self.pending.pop(0)
            work.wait()

    def _recv(self, shapes: List[Tuple[int, ...]], rank: int, dtype=torch.float32, tag: int = 0) -> List[torch.Tensor]:
        out = []
        for shape in shapes:
            buffer = torch.empty(shape, dtype=dtype, device=self.b.device)
            dist.recv(buffer, src=rank, group=self.b.topology.pipeline_group, tag=tag)
            out.append(buffer)
        return out

    def _encode_ahead(self) -> None:
        """The first stage, before it waits: the encoder pass of the next micro-batch of the stream
        not yet encoded, at most `RUN_AHEAD` ahead, sent tagged with its place in the stream."""
        for micro in self.queue[self.next_micro:self.next_micro + RUN_AHEAD]:
            if micro.ahead is None:
                micro.ahead = self._encode_first(micro)
                return

    def _encode_first(self, micro: MicroBatch) -> List[Tuple[object, torch.Tensor]]:
        """Chunk 0's encoder pass of `micro`, sent to chunk 1's stage tagged; returns the sends."""
        carried = self.b.chunks[0].encode({"input_ids": micro.ids, "attention_mask": micro.source_mask})
        return self._send(list(carried.values()), self._rank(1), tag=micro.tag)

    # ----- the schedule -----

    def run(self) -> None:
        tick = 0
        while self.next_micro < len(self.queue) or any(s.micro is not None for s in self.slots):
            for round_ in range(self.rounds):
                chunk = round_ * self.stages + self.stage
                for slot in self.slots:
                    if round_ == 0:
                        self._advance(slot, tick)
                    if slot.micro is None:
                        continue
                    if slot.step < 0:
                        self._encode(slot, chunk)
                    else:
                        self._decode(slot, chunk)
            for slot in self.slots:
                if slot.micro is not None:
                    slot.step += 1
            tick += 1
        self._flush()

    def _advance(self, slot: Slot, tick: int) -> None:
        """At the slot's first visit of a tick: learn how its last position ended (the last stage's
        report) and let the next micro-batch in when it is done. Every rank decides alike."""
        micro = slot.micro
        if micro is not None and slot.step > 0:
            if self.stage != self.last % self.stages:
                if self.runs_ahead:
                    self._encode_ahead()
                report = self._recv([(micro.rows + 1,)], self._rank(self.last), torch.long)[0]
                micro.tokens.append(report[:micro.rows])
                micro.done = bool(report[micro.rows])
            if micro.done:
                slot.micro, slot.caches, slot.carried = None, {}, {}
        if slot.micro is None and tick >= slot.start_tick and self.next_micro < len(self.queue):
            slot.micro, slot.step = self.queue[self.next_micro], -1
            self.next_micro += 1

    def _encode(self, slot: Slot, chunk: int) -> None:
        """This rank's chunk of the slot's encoder pass; the chunks with decoder blocks keep the
        cross-attention keys and values for the micro-batch."""
        micro = slot.micro
        chunk_module = self.b.chunks[chunk]
        if chunk == 0 and self.tagged:
            self._pending(micro.ahead if micro.ahead is not None else self._encode_first(micro))
            return
        tag = micro.tag if chunk == 1 and self.tagged else 0
        if chunk == 0:
            carried = {"input_ids": micro.ids}
        elif self._local(chunk - 1):
            carried = slot.carried
        elif boundary_kind(self.b.plan.stage_blocks[chunk - 1], self.b.num_layers) == ENCODER:
            hidden, bias = self._recv([(micro.rows, micro.width, self.b.d_model),
                                       (1, self.b.heads, micro.width, micro.width)], self._rank(chunk - 1), tag=tag)
            carried = {"hidden": hidden, "encoder_bias": bias}
        else:
            carried = {"encoder_output": self._recv([(micro.rows, micro.width, self.b.d_model)],
                                                    self._rank(chunk - 1), tag=tag)[0]}
        carried = chunk_module.encode(dict(carried, attention_mask=micro.source_mask if chunk_module.embeds_input
                                           else micro.mask))
        if chunk_module.decoder_ids:
            slot.caches[chunk] = chunk_module.start_decoding(carried["encoder_output"], micro.mask)
        if chunk < self.last:
            if self._local(chunk + 1):
                slot.carried = carried
            else:
                self._send(list(carried.values()), self._rank(chunk + 1))

    def _decode(self, slot: Slot, chunk: int) -> None:
        """This rank's chunk of one decoding position of the slot's micro-batch."""
        micro, position = slot.micro, slot.step
        hidden: Optional[torch.Tensor] = None
        bias: Optional[torch.Tensor] = None
        if chunk == 0:
            if position == 0:
                previous = torch.full((micro.rows,), self.b.start_id, dtype=torch.long, device=self.b.device)
            else:
                previous = micro.tokens[-1]
            hidden = self.b.chunks[0].embed_tokens(previous[:, None])
            if self.first_decoder != 0:
                if self._local(self.first_decoder):
                    slot.carried = {"hidden": hidden}
                else:
                    self._send([hidden], self._rank(self.first_decoder))
        if chunk not in self.decoder_chunks:
            return
        if chunk == self.first_decoder:
            if chunk != 0:
                hidden = slot.carried["hidden"] if self._local(0) else \
                    self._recv([(micro.rows, 1, self.b.d_model)], self._rank(0))[0]
        elif self._local(chunk - 1):
            hidden, bias = slot.carried["hidden"], slot.carried["bias"]
        else:
            hidden, bias = self._recv([(micro.rows, 1, self.b.d_model), (1, self.b.heads, 1, position + 1)],
                                      self._rank(chunk - 1))
        out = self.b.chunks[chunk].decode_step(position, hidden, bias, slot.caches[chunk])
        if chunk != self.last:
            hidden, bias = out
            if self._local(chunk + 1):
                slot.carried = {"hidden": hidden, "bias": bias}
            else:
                self._send([hidden, bias], self._rank(chunk + 1))
            return
        self._choose(micro, out, position)

    def _choose(self, micro: MicroBatch, logits: torch.Tensor, position: int) -> None:
        """The last stage: this position's greedy tokens (padding after a row's end), and the
        report every other rank of the pipeline acts on."""
        if micro.finished is None:
            micro.finished = torch.zeros(micro.rows, dtype=torch.bool, device=self.b.device)
        tokens = torch.where(micro.finished, torch.full_like(micro.finished, self.b.pad_id, dtype=torch.long),
                             logits.argmax(-1))
        micro.finished |= tokens == self.b.eos_id
        micro.tokens.append(tokens)
        micro.done = bool(micro.finished.all()) or position + 1 >= self.max_new_tokens
        report = torch.cat([tokens, torch.tensor([int(micro.done)], dtype=torch.long, device=self.b.device)])
        for stage in range(self.stages):
            if stage != self.stage:
                self._send([report], self.b.topology.rank_of_stage(stage))
