"""One process on one device (a GPU when present, else the CPU)."""
import contextlib
from typing import Dict, List, Mapping

import torch

from ..data.batching import GlobalBatch, collate
from ..errors import UserError
from ..model_source import whole_model
from .. import quantization
from .base import Backend, StepResult, all_finite, trim_at_eos, update_is_finite
from .fast_ops import use_fast_ops
from .optim import (build_optimizer, load_named_optimizer_state, lr_at, named_optimizer_state,
                     set_lr, token_loss)
from .precision import autocast_dtype, eval_autocast_dtype, precision_phrase


def refuse_fp16(training) -> None:
    """float16 training is the IPU backend's alone: off the IPU, T5 overflows in it."""
    if training.fp16:
        raise UserError("training.fp16 is the IPU's precision; T5 overflows in float16 on CPUs and GPUs. "
                        "Use training.bf16=true instead.")


def compiled(model: torch.nn.Module):
    """`torch.compile(model)`, or a UserError naming the fix where this torch cannot compile."""
    try:
        return torch.compile(model)
    except (AttributeError, RuntimeError) as err:  # torch.compile is missing or refuses this Python
        raise UserError("training.torch_compile is set but torch {} cannot compile here ({}): set "
                        "training.torch_compile=false.".format(torch.__version__, str(err).splitlines()[0])) from None


class SingleProcessBackend(Backend):
    """The whole model on one device; micro-batches accumulate gradients before each step."""

    name = "single"

    @classmethod
    def layout_plan(cls, config, lengths, size=None):
        from ..layout import plan_from_config
        from .batch_search import fitted_plan

        return fitted_plan(config, lengths.source, lengths.target, lambda c: plan_from_config(
            c, lengths.source, lengths.target, split_by=cls.split_by, size=size))

    @classmethod
    def check_memory(cls, config, plan, lengths):
        from .torch_distributed.memory_report import check_layout_fits

        check_layout_fits(config, plan, lengths.source, lengths.target)

    def __init__(self, config, plan, device=None):
        super().__init__(config, plan)
        if plan.world_size != 1:
            raise UserError("the single-process backend runs 1 stage x 1 replica, but the layout asks for "
                            "{} x {}: use --backend torch (run.sh launches it).".format(plan.stages, plan.replicas))
        refuse_fp16(config.training)
        quantization.require(config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp_dtype = autocast_dtype(config.training.bf16, self.device)
        self.eval_amp_dtype = eval_autocast_dtype(config.validation.bf16, self.amp_dtype)

    @property
    def description(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return "single process on {} ({})".format(where, precision_phrase(
            self.amp_dtype, self.eval_amp_dtype, self.config.training.bf16, self.device))

    def _autocast(self, dtype):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def setup(self, model) -> None:
        model = whole_model(model, self.device)
        use_fast_ops(model)
        self.model = model.to(self.device)
        self.pad_id = model.config.pad_token_id
        self.eos_id = model.config.eos_token_id
        self.optimizer = build_optimizer(self.model.named_parameters(), self.config.training)
        self.forward = compiled(self.model) if self.config.training.torch_compile else self.model
        self.pin_memory = self.device.type == "cuda" and self.config.data.dataloader_pin_memory

    def _on_device(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # Page-locked host memory lets the copy run asynchronously, behind the queued GPU work.
        if self.pin_memory:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}

    def train_step(self, batch: GlobalBatch, step: int) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = batch.num_target_tokens
        loss = torch.zeros((), device=self.device)
        # Every micro-batch is collated and its copy queued before the first forward, so no copy
        # waits behind the previous micro-batch's backward.
        micro_batches = [self._on_device(collate(micro, self.pad_id)) for micro in self.plan.split(batch.samples)[0]]
        for tensors in micro_batches:
            with self._autocast(self.amp_dtype):
                logits = self.forward(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                                      decoder_input_ids=tensors["decoder_input_ids"], use_cache=False).logits
            micro_loss = token_loss(logits, tensors["labels"], total_tokens)
            micro_loss.backward()
            loss += micro_loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.training.max_grad_norm)
        lr = lr_at(step, self.config.training)
        finite = update_is_finite(loss, grad_norm)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        # Gradients exist only within a step: checkpoints, exports and validation run without them,
        # and a skipped step leaves none behind.
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss.item(), grad_norm=float(grad_norm), lr=lr, skipped=not finite)

    @torch.no_grad()
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        self.model.eval()
        tensors = self._on_device(collate(samples, self.pad_id))
        with self._autocast(self.eval_amp_dtype):
            output = self.model.generate(
                input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                decoder_start_token_id=self.model.config.decoder_start_token_id,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        return [trim_at_eos(row[1:], self.eos_id) for row in output.tolist()]

    def model_state_dict(self) -> Mapping[str, torch.Tensor]:
        if quantization.enabled(self.config):
            # Dequantised to float32 one tensor at a time, under the same names.
            return quantization.FloatWeights(self.model)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        # Name by name, so a lazy `state` is read one tensor at a time (load_state_dict would read
        # every tensor into a copy of the whole model first).
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in state:
                    param.copy_(state[name])

    def weights_finite(self) -> bool:
        # On the device, without the CPU copy `export_share` makes. A quantised base's packed codes
        # are bytes, not numbers (stored as float32), and frozen: there only what trains is checked.
        frozen_codes = quantization.enabled(self.config)
        return all_finite(p for p in self.model.parameters() if p.requires_grad or not frozen_codes)

    def optimizer_state_dict(self) -> Dict:
        return named_optimizer_state(self.optimizer, self.model.named_parameters())

    def load_optimizer_state_dict(self, state: Dict) -> None:
        load_named_optimizer_state(self.optimizer, self.model.named_parameters(), state)

    def release_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def release_model(self) -> None:
        self.model = self.forward = self.optimizer = None
