"""LoRA on a quantised base (QLoRA's recipe): the frozen base weights in 8-bit (LLM.int8) or 4-bit
NormalFloat through transformers' `BitsAndBytesConfig`, prepared by `peft.prepare_model_for_kbit_training`,
LoRA's adapters in float32 on top; on the single-process and torch.distributed backends, wherever
bitsandbytes runs (GPUs, and from 0.45 its CPU backend).

One process builds the float base as any run does (read or drawn by name), saves it to a temporary
directory and loads it back quantised by `from_pretrained(quantization_config=...)`. A pipeline stage
holds no whole model to save: its frame is the meta-device model with bitsandbytes' layers put in as
`from_pretrained` puts them (`quantised_frame`, transformers' own `replace_with_bnb_linear`), and each
of its weights is quantised as it is read, as `from_pretrained` quantises it (`quantised_weight`),
so every stage holds the same bytes one process holds.

Every Linear is quantised, the LM head and T5's `wo` included (transformers keeps both in float by
default: the head by habit, `wo` against float16 overflow, which a float32 compute dtype does not
have); the embeddings, norms and relative-position biases stay float32. The export is float:
`FloatWeights` dequantises the base, and LoRA's merge (`ipu_t5.lora`) adds the adapters to it as
for a float base.
"""
import tempfile
from typing import Dict, Iterator, Mapping, Optional

import torch

from .errors import UserError


def enabled(config) -> bool:
    """Whether the run's base weights are quantised."""
    return config.model.quantization != "none"


def refuse_here(config, backend: str) -> None:
    """One line for backends that cannot hold a bitsandbytes model."""
    if enabled(config):
        raise UserError("model.quantization={} runs on the single-process and torch backends only (bitsandbytes' "
                        "layers); use --backend single or torch, or model.quantization=none on the {} backend.".format(
                            config.model.quantization, backend))


def require(config) -> None:
    """One line, before any weight is read, where the run quantises but bitsandbytes is missing."""
    if not enabled(config):
        return
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig  # noqa: F401
    except ImportError:
        raise UserError("model.quantization={} needs bitsandbytes (pip install 'bitsandbytes>=0.45', which runs on "
                        "GPUs and CPUs; not on the Poplar SDK's torch 2.0.1), or set model.quantization=none.".format(
                            config.model.quantization)) from None


def bnb_config(kind: str):
    """transformers' BitsAndBytesConfig for `kind` (int8 or nf4), computing in float32, every Linear
    quantised (no skipped modules)."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        # Packed codes stored as float32 (the same bytes): T5's feed-forward casts its input to `wo`'s
        # dtype unless that is int8, which would turn activations into uint8 under the default storage.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  bnb_4bit_quant_storage=torch.float32, llm_int8_skip_modules=[])
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[])


def _quantisable_t5():
    from transformers import T5ForConditionalGeneration

    class QuantisableT5(T5ForConditionalGeneration):
        # T5 keeps `wo` in float32 against float16 overflow; computing in float32 it quantises safely.
        # transformers 4.x reads the class's list, 5.x the instance's (gathered from its stacks).
        _keep_in_fp32_modules = None

        def post_init(self):
            super().post_init()
            self._keep_in_fp32_modules = set()

    return QuantisableT5


def load_quantised(base: torch.nn.Module, kind: str, device) -> torch.nn.Module:
    """`base` (a float T5, which the caller holds no other reference to, so it is freed once written)
    quantised to `kind` on `device`, prepared for k-bit training (every weight frozen)."""
    quantization = bnb_config(kind)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        del base
        try:
            model = _quantisable_t5().from_pretrained(tmp, quantization_config=quantization,
                                                      device_map={"": str(device)})
        except (ImportError, RuntimeError, ValueError) as err:  # bitsandbytes without a backend for this device
            raise _cannot_quantise(kind, device, err) from None
    return _prepared(model)


def _cannot_quantise(kind: str, device, err: Exception) -> UserError:
    return UserError("model.quantization={}: bitsandbytes cannot quantise on {} here ({}); set "
                     "model.quantization=none.".format(kind, device, str(err).splitlines()[0]))


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    """`model`'s bitsandbytes layers set to compute as the float export does, and peft's k-bit
    preparation (every weight frozen, half-precision ones made float32)."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Its CPU inference format rounds the block scales to bfloat16 and computes in bfloat16:
            # validation would then not predict as the float export (or training) computes.
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantised_frame(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """`model` (a float T5 on the meta device) as `from_pretrained(quantization_config=bnb_config(kind))`
    holds it before reading a weight: every Linear replaced by bitsandbytes' layer on the meta device,
    marked loaded in k bits (so peft wraps those layers in its bitsandbytes LoRA layers), prepared
    as `load_quantised` prepares it. `quantised_weight` fills its weights."""
    from transformers.integrations import replace_with_bnb_linear

    model = replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=bnb_config(kind))
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return _prepared(model)


def quantised_weight(param: torch.Tensor, value: torch.Tensor, device) -> Optional[torch.nn.Parameter]:
    """The weight that replaces `param`, a bitsandbytes layer's weight on the meta device
    (`quantised_frame`): its float32 `value` quantised on `device` as transformers' loading quantises
    it (bitsandbytes' Params4bit / Int8Params with the meta weight's settings); None where `param` is
    a plain one."""
    kind = type(param).__name__
    if kind not in ("Params4bit", "Int8Params"):
        return None
    import bitsandbytes as bnb

    settings = dict(param.__dict__)
    try:
        if kind == "Params4bit":
            return bnb.nn.Params4bit(value.cpu(), requires_grad=False, **settings).to(device)
        settings.pop("SCB", None)
        return bnb.nn.Int8Params(value.cpu(), requires_grad=False, **settings).to(device)
    except (ImportError, RuntimeError, ValueError) as err:  # bitsandbytes without a backend for this device
        raise _cannot_quantise("nf4" if kind == "Params4bit" else "int8", device, err) from None


def quantised_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """bitsandbytes' layers of `model` by module name."""
    import bitsandbytes as bnb

    return {name: module for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def dequantised(module: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes Linear4bit / Linear8bitLt holds (out x in)."""
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    return weight.data.float() * scale.float().unsqueeze(1) / 127.0


class FloatWeights(Mapping):
    """A quantised model's weights by name, float32 on the CPU: each bitsandbytes weight dequantised
    when looked up (one at a time, never the whole float model), bitsandbytes' own entries (absmax,
    quant_map, SCB, ...) left out; Hugging Face's (or peft's) names and shapes."""

    def __init__(self, model: torch.nn.Module):
        self._quantised = {name + ".weight": module for name, module in quantised_modules(model).items()}
        owners = tuple(name[:-len("weight")] for name in self._quantised)
        self._plain = {k: v for k, v in model.state_dict().items()
                       if k in self._quantised or not k.startswith(owners)}

    def __getitem__(self, name: str) -> torch.Tensor:
        module = self._quantised.get(name)
        if module is not None:
            return dequantised(module).detach().cpu()
        return self._plain[name].detach().cpu()

    def __iter__(self) -> Iterator[str]:
        return iter(self._plain)

    def __len__(self) -> int:
        return len(self._plain)


def weight_bytes(model: torch.nn.Module) -> Dict[str, int]:
    """Bytes of the base's weights as the module holds them (its tensors, quantised, each counted once
    however many names share it) and as float32; LoRA's adapters left out."""
    from .lora import is_adapter_key

    quantised = quantised_modules(model)
    held, floats, seen = 0, 0, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_adapter_key(name) or not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        held += tensor.numel() * tensor.element_size()
        if not any(name.startswith(q + ".") for q in quantised):
            floats += tensor.numel() * 4
    floats += sum(4 * m.in_features * m.out_features for m in quantised.values())
    return {"held": held, "float32": floats}
