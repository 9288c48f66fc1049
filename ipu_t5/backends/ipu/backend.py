"""Graphcore IPUs through poptorch (Poplar SDK 3.3/3.4: Python 3.8, torch 2.0.1).

poptorch is imported here only, and only when this backend is chosen or `--backend auto` asks
whether IPUs are present. One process drives every IPU: the layout's stages are IPUs, its replicas
poptorch's replication factor, its micro-batches gradient accumulation (`ipu_t5.backends.ipu.backend.plan` checks
the rules and the memory first). Shapes are static: prompts are padded to one length chosen from
the data (`ipu.source_length_coverage` of them fit; the trainer tokenizes the rest truncated to it)
and targets to the longest, so the model compiles once for training and once for generation.

Training: `poptorch.trainingModel` with `poptorch.optim.AdamW` (float16 weights, float16 gradient
accumulators with a static or automatic loss scale, float32 moments, clipping by `max_grad_norm`,
stochastic rounding), the learning rate of `lr_at(step)` sent with `setOptimizer` whenever it
changes, gradients summed over micro-batches and replicas because each micro-batch's loss is
already its share of the global token mean. poptorch clips on the device and does not report the
gradient norm, so steps report it as NaN.

Generation: under phased execution, the encoder once per batch and then the decoder one position
at a time against key/value caches kept on the device (`kv_generation.py`); otherwise (pipelined,
or LoRA-adapted phases) `poptorch.inferenceModel` of the same weights returns the greedy token at
every target position and the host feeds each one back, re-running the encoder per token as
Graphcore's own Flan-T5 validation does. Training and inference executors share the IPUs, so the idle one is
detached (weights and optimizer state go back to the host and return on attach).
"""
import importlib
import math
from typing import Any, Dict, List, Optional

import torch

from ...data.batching import IGNORE_INDEX, GlobalBatch, collate
from ...errors import UserError
from ...model_source import whole_model
from ...quantization import refuse_here as refuse_quantised
from ..base import Backend, StepResult, trim_at_eos
from ..optim import adamw_kwargs, lr_at, param_groups, set_lr
from .model import (LM_HEAD_KEY, T5ForIpuGeneration, T5ForIpuTraining, checkpoint_every_block, hf_state_dict,
                    join_slices, load_hf_state_dict, place, slice_counts, slice_vocabulary, split_like_slices)
from .hardware import ipu_hardware_available  # noqa: F401 (its home before hardware.py)
from . import kv_generation
from .batch_serial import popart_settings
from .plan import IpuPlan, plan_ipu

# PopART's names for AdamW's state of a weight: prefix + the weight's name in the wrapped model
# (its first and second moments, and the step count bias correction uses).
STATE_PREFIXES = {"exp_avg": "Accl1___", "exp_avg_sq": "Accl2___", "step": "Step___"}
WRAPPER_PREFIX = "t5."
# The modules `slice_vocabulary` replaces by vocabulary slices, and their plain weights.
SLICED = ("shared", "lm_head")
SLICED_KEYS = ("shared.weight", LM_HEAD_KEY)
# Each micro-batch's loss is a small share of the global token mean: scaled by this, its float16
# gradients stay clear of underflow while the scaled loss stays far below float16's 65504.
DEFAULT_LOSS_SCALING = 1024.0
# PopART's RecomputationType.Pipeline (popart.RecomputationType: None_ 0, Standard 1, NormOnly 2,
# Pipeline 3): a pipeline stage's backward recomputes its forward from the checkpoints.
RECOMPUTE_PIPELINE = 3
SDK_HINT = ("enable the Poplar SDK (source <sdk>/enable) and install its poptorch wheel into this environment "
            "(pip install <sdk>/poptorch-*.whl); docs/ipu.md, 'Setting up', has the steps")


def import_poptorch():
    """poptorch, or a UserError saying how to get it."""
    try:
        return importlib.import_module("poptorch")
    except (ImportError, OSError) as err:
        raise UserError("backend 'ipu' needs poptorch from the Poplar SDK ({}): {}.".format(err, SDK_HINT)) from None


def static_batch(samples: List[Dict], pad_id: int, source_length: int, target_length: int) -> Dict[str, torch.Tensor]:
    """`collate` padded to fixed lengths, so every call has the compiled shapes."""
    tensors = collate(samples, pad_id, source_length=source_length)
    depth = tensors["labels"].shape[1]
    if depth < target_length:
        extra = target_length - depth
        tensors["labels"] = torch.nn.functional.pad(tensors["labels"], (0, extra), value=IGNORE_INDEX)
        tensors["decoder_input_ids"] = torch.nn.functional.pad(tensors["decoder_input_ids"], (0, extra), value=pad_id)
    return tensors


class IpuBackend(Backend):
    """The layout on Graphcore IPUs: pipelined, or phased with weights streamed."""

    name = "ipu"
    static_prompt_length = True
    # The IPU planner starts from the compute-balanced cut and weighs a parameter-balanced one itself.
    split_by = "compute"

    def __init__(self, config, plan):
        super().__init__(config, plan)
        if config.peft.method == "prompt_tuning":
            # The IPU's embedding phase is split into vocabulary slices with static prompt shapes;
            # it carries no extra positions in front of the prompt.
            raise UserError("peft.method=prompt_tuning runs on the single and torch backends only: use --backend "
                            "single or --backend torch, or --peft lora on IPUs.")
        refuse_quantised(config, "IPU")
        self.ipu_plan: Optional[IpuPlan] = None
        self.training_model = None
        self.inference_model = None
        self.kv_generator = None
        self._lr: Optional[float] = None
        self._steps = 0
        self._restored_rng: Optional[List[int]] = None

    @property
    def description(self) -> str:
        if self.ipu_plan is None:
            return "IPU (poptorch)"
        return "IPU (poptorch): {}".format(self.ipu_plan.summary())

    # ----- setup -----

    def setup(self, model) -> None:
        model = whole_model(model)
        if self.lengths is None:
            raise UserError("the IPU backend compiles static shapes and needs the data's token lengths: build it "
                            "set backend.lengths before setup (T5Trainer does).")
        self.ipu_plan = plan_ipu(self.config, self.plan, self.lengths.static_source or self.lengths.source,
                                 self.lengths.target)
        self.plan = self.ipu_plan.layout
        poptorch = import_poptorch()
        self.poptorch = poptorch
        if not poptorch.ipuHardwareIsAvailable(self._reserved_ipus()):
            raise UserError("the layout needs {} IPUs ({} per replica x {} replica(s)) but poptorch reports fewer: "
                            "lower --replicas or --stages (`ipu-t5 plan` shows what fits), or use --backend single "
                            "or torch.".format(self.ipu_plan.total_ipus, self.ipu_plan.ipus_per_replica,
                                               self.ipu_plan.replicas))
        self.pad_id = model.config.pad_token_id
        self.eos_id = model.config.eos_token_id
        self.start_id = model.config.decoder_start_token_id
        self.hf_keys = list(model.state_dict().keys())
        # A wrapped (LoRA-adapted) embedding or LM head has other names than its plain weight.
        sliced = sorted({k.split(".")[0] for k in self.hf_keys if k.split(".")[0] in SLICED and k not in SLICED_KEYS})
        if sliced:
            raise UserError("peft.target_modules adapts {}, which the IPU backend splits into vocabulary slices that "
                            "carry no LoRA adapter: adapt the attention or feed-forward layers (q, k, v, o, wi_0, "
                            "wi_1, wo), or use --backend torch or single.".format(", ".join(sliced)))
        self._arrange(model)
        self.t5 = model
        # The two wrappers share the T5, so each sets its mode before poptorch traces it (train_step,
        # generate): the mode at trace time decides whether the compiled graph has dropout.
        self.train_module = T5ForIpuTraining(model, poptorch.identity_loss)
        self.generate_module = T5ForIpuGeneration(model)
        training = self.config.training
        moments = torch.float32
        self.optimizer = poptorch.optim.AdamW(
            param_groups(self.train_module.named_parameters(), training.weight_decay),
            weight_decay=training.weight_decay,
            loss_scaling=(self.config.ipu.loss_scaling or DEFAULT_LOSS_SCALING) if self.ipu_plan.half else 1.0,
            accum_type=torch.float16 if self.ipu_plan.half else torch.float32,
            first_order_momentum_accum_type=moments, second_order_momentum_accum_type=moments,
            max_grad_norm=training.max_grad_norm or None, **adamw_kwargs(training))
        self._lr = training.learning_rate
        self.training_model = poptorch.trainingModel(self.train_module, options=self._options(training=True),
                                                     optimizer=self.optimizer)

    def _arrange(self, model: torch.nn.Module) -> None:
        """Cut the T5 as the plan says (vocabulary slices for a pipeline; every phase split over
        its IPUs when phased, LoRA adapters with their layers), give it float16 numerics, and put
        each part in its poptorch block."""
        plan, begin_block = self.ipu_plan, self.poptorch.BeginBlock
        if plan.execution == "phased":
            from .split import place_split, split_t5

            split = split_t5(model, plan.ipus_per_phase, plan.embedding_serialization_factor, plan.half,
                             self._checkpoint())
            if plan.half:
                model.half()
            place_split(split, dict(plan.phases()), begin_block)
            return
        slice_vocabulary(model, plan.embedding_serialization_factor)
        if plan.half:
            from .fp16 import use_float16_numerics

            use_float16_numerics(model)
            model.half()
        place(model, plan.pieces, begin_block)
        if self._checkpoint() is not None:
            checkpoint_every_block(model, self._checkpoint())

    def _checkpoint(self):
        """poptorch's recomputationCheckpoint when `ipu.recompute_checkpoint_every_layer`, else None."""
        return self.poptorch.recomputationCheckpoint if self.config.ipu.recompute_checkpoint_every_layer else None

    def _reserved_ipus(self) -> int:
        total = self.ipu_plan.total_ipus
        return 1 << (total - 1).bit_length() if self.config.ipu.auto_round_num_ipus else total

    def _cache_dir(self) -> str:
        configured = self.config.ipu.executable_cache_dir
        if configured is not None:
            return configured
        from ...tokenizer import cache_root

        return str(cache_root() / "executables")

    def _strategy(self, only: Optional[List[str]] = None):
        """The plan's execution strategy; `only`: the phases an executor runs (KV generation)."""
        poptorch, plan = self.poptorch, self.ipu_plan
        if plan.execution == "pipelined":
            return poptorch.PipelinedExecution(*[
                poptorch.Stage(*[p.name for p in plan.pieces if p.ipu == ipu]).ipu(ipu)
                for ipu in range(plan.ipus_per_replica)])
        from .split import block_id

        # One stage per IPU of a phase, each holding that IPU's part (`split.place_split` names them).
        phases = [poptorch.Phase(*[poptorch.Stage(block_id(name, part)).ipu(ipu) for part, ipu in enumerate(ipus)])
                  for name, ipus in plan.phases() if only is None or name in only]
        if plan.phasing == "serial":
            strategy = poptorch.SerialPhasedExecution(*phases)
            # Activations leave the chip after every phase: an IPU holds one phase at a time.
            strategy.setTensorsLiveness(poptorch.Liveness.OffChipAfterEachPhase)
        else:
            strategy = poptorch.ParallelPhasedExecution(*phases)
            strategy.sendTensorsOffChipAfterFwd(True)
        return strategy

    def _locations(self, opts) -> None:
        poptorch, plan = self.poptorch, self.ipu_plan
        sharded = plan.shards > 1

        def streamed(shard: bool):
            return poptorch.TensorLocationSettings().useOnChipStorage(False).useReplicatedTensorSharding(shard)

        if plan.execution == "phased":
            opts.TensorLocations.setWeightLocation(streamed(sharded))
            opts.TensorLocations.setOptimizerLocation(streamed(sharded))
            opts.TensorLocations.setAccumulatorLocation(streamed(False))
            opts.TensorLocations.setActivationLocation(streamed(False))
        elif plan.optimizer_state_offchip:
            opts.TensorLocations.setOptimizerLocation(streamed(sharded))

    def _options(self, training: bool, phases: Optional[List[str]] = None):
        poptorch, plan, ipu = self.poptorch, self.ipu_plan, self.config.ipu
        opts = poptorch.Options()
        opts.replicationFactor(plan.replicas)
        opts.randomSeed(self.config.training.seed)
        opts.autoRoundNumIPUs(ipu.auto_round_num_ipus)
        opts.setAvailableMemoryProportion({"IPU{}".format(i): ipu.matmul_proportion
                                           for i in range(plan.ipus_per_replica)})
        opts.Precision.setPartialsType(torch.float16 if ipu.enable_half_partials else torch.float32)
        if plan.half:
            opts.Precision.enableStochasticRounding(ipu.enable_stochastic_rounding)
        cache = self._cache_dir()
        if cache:
            opts.enableExecutableCaching(cache)
        if training:
            opts.deviceIterations(1)
            opts.Training.gradientAccumulation(plan.layout.micro_batches)
            opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Sum)
            opts.Training.setAutomaticLossScaling(ipu.auto_loss_scaling)
            opts.outputMode(poptorch.OutputMode.Sum)
            if ipu.recompute_checkpoint_every_layer and plan.execution == "pipelined":
                # The memory and cost plan count a pipeline's stash as block inputs and one more
                # forward pass (memory.py, cost.py); phased execution streams each phase's saved
                # values out instead, so recomputation stays off there and its checkpoints are inert.
                opts._Popart.set("autoRecomputation", RECOMPUTE_PIPELINE)
            if plan.batch_serial is not None:
                # One micro-batch per replica, sliced inside the program (batch_serial.py).
                for key, value in popart_settings(plan.batch_serial).items():
                    opts._Popart.set(key, value)
        else:
            opts.deviceIterations(plan.inference_device_iterations)
            opts.outputMode(poptorch.OutputMode.All)
        self._locations(opts)
        opts.setExecutionStrategy(self._strategy(phases))
        return opts

    # ----- executors share the IPUs -----

    def _compiled(self) -> List:
        """The executors poptorch has compiled."""
        kv = self.kv_generator.executors() if self.kv_generator is not None else []
        return [e for e in [self.training_model, self.inference_model] + kv if e is not None and e.isCompiled()]

    def _attached(self) -> List:
        """The compiled executors that hold the IPUs now."""
        return [e for e in self._compiled() if e.isAttachedToDevice()]

    def _activate(self, wanted) -> None:
        """Detach whichever executor is not `wanted`; poptorch attaches `wanted` on its next call."""
        for executor in self._attached():
            if executor is not wanted:
                executor.detachFromDevice()

    def _sync_weights_to_host(self) -> None:
        if self.training_model in self._attached():
            self.training_model.copyWeightsToHost()

    # ----- training -----

    def train_step(self, batch: GlobalBatch, step: int) -> StepResult:
        self._activate(self.training_model)
        self.train_module.train()
        tensors = static_batch(batch.samples, self.pad_id, self.ipu_plan.source_length, self.ipu_plan.target_length)
        counts = torch.full((len(batch.samples),), float(batch.num_target_tokens))
        lr = lr_at(step, self.config.training)
        if lr != self._lr:
            set_lr(self.optimizer, lr)
            self.training_model.setOptimizer(self.optimizer)
            self._lr = lr
        inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["decoder_input_ids"], tensors["labels"], counts)
        if self._restored_rng is not None:  # a resumed run: the IPUs continue the saved random stream
            if not self.training_model.isCompiled():
                self.training_model.compile(*inputs)
            self.training_model.rng_state = self._restored_rng
            self._restored_rng = None
        loss = self.training_model(*inputs)
        self._steps += 1
        loss = float(loss.float().sum())
        # The update ran on the device, where poptorch's float16 loss scaling governs overflow; the
        # host sees only the loss, and counts a step whose loss is not finite as skipped.
        return StepResult(loss=loss, grad_norm=math.nan, lr=lr, skipped=not math.isfinite(loss))

    def extra_state(self) -> Dict[str, Any]:
        # Dropout draws from the IPUs' own generator, which the host's saved generators do not cover.
        if self.training_model is not None and self.training_model.isCompiled():
            return {"ipu_rng_state": list(self.training_model.rng_state)}
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self._restored_rng = state.get("ipu_rng_state")

    # ----- generation -----

    def _inference_batch(self) -> int:
        per_call = self.ipu_plan.inference_device_iterations * self.ipu_plan.replicas
        micro = -(-self.config.validation.per_device_eval_batch_size // per_call)
        return micro * per_call

    @torch.no_grad()
    def generate(self, samples: List[Dict], max_new_tokens: int) -> List[List[int]]:
        if kv_generation.supports(getattr(self.t5, "ipu_split", None)):
            if self.kv_generator is None or self.kv_generator.positions != max_new_tokens:
                for executor in self.kv_generator.executors() if self.kv_generator is not None else []:
                    if executor.isCompiled():
                        executor.destroy()
                self.kv_generator = kv_generation.KvGenerator(self, max_new_tokens)
            self.generate_module.eval()
            return self.kv_generator.generate(samples, max_new_tokens, self.pad_id, self.start_id, self.eos_id,
                                              self.ipu_plan.source_length, self._activate)
        if self.inference_model is None:
            self.inference_model = self.poptorch.inferenceModel(self.generate_module,
                                                                options=self._options(training=False))
        self._activate(self.inference_model)
        self.generate_module.eval()
        size = self._inference_batch()
        generated: List[List[int]] = []
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            tensors = collate(padded, self.pad_id, source_length=self.ipu_plan.source_length)
            decoder = torch.full((size, max_new_tokens), self.pad_id, dtype=torch.int64)
            decoder[:, 0] = self.start_id
            tokens = []
            for position in range(max_new_tokens):
                predicted = self.inference_model(tensors["input_ids"], tensors["attention_mask"], decoder)
                next_tokens = predicted[:, position].to(torch.int64)
                tokens.append(next_tokens)
                if position + 1 < max_new_tokens:
                    decoder[:, position + 1] = next_tokens
            rows = torch.stack(tokens, dim=1).tolist()[:len(chunk)]
            generated += [trim_at_eos(row, self.eos_id) for row in rows]
        return generated

    # ----- state by Hugging Face name -----

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        self._sync_weights_to_host()
        return {k: v.detach().cpu() for k, v in hf_state_dict(self.t5, self.hf_keys).items()}

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        load_hf_state_dict(self.t5, state)
        for executor in self._attached():
            executor.copyWeightsToDevice()

    def optimizer_state_dict(self) -> Dict:
        state = self.optimizer.state_dict().get("ipu_state") or {}
        named: Dict[str, Dict[str, torch.Tensor]] = {}
        for kind, prefix in STATE_PREFIXES.items():
            start = prefix + WRAPPER_PREFIX
            part = {key[len(start):]: value.detach().float().cpu() for key, value in state.items()
                    if key.startswith(start)}
            for name, tensor in join_slices(part).items():
                named.setdefault(name, {})[kind] = tensor
        for entry in named.values():
            # Without bias correction PopART keeps no step count; torch's AdamW needs one.
            entry.setdefault("step", torch.tensor(float(self._steps)))
        return named

    def load_optimizer_state_dict(self, state: Dict) -> None:
        counts = slice_counts(self.t5)
        ipu_state = {}
        for name, entry in state.items():
            for kind, prefix in STATE_PREFIXES.items():
                if kind in entry:
                    value = entry[kind] if torch.is_tensor(entry[kind]) else torch.tensor(float(entry[kind]))
                    for part, tensor in split_like_slices(name, value, counts).items():
                        ipu_state[prefix + WRAPPER_PREFIX + part] = tensor.float().clone(memory_format=torch.contiguous_format)
            if "step" in entry:
                self._steps = int(float(entry["step"]))
        full = self.optimizer.state_dict()
        full["ipu_state"] = ipu_state
        # Hyperparameters missing from a checkpoint keep the values the optimizer was built with.
        full["ipu_param"] = full.get("ipu_param") or {}
        self.optimizer.load_state_dict(full)

    def close(self) -> None:
        for executor in self._compiled():
            executor.destroy()
