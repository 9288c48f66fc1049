"""LoRA through `peft`: adapters injected into the model before a backend takes it, so every
backend trains only them; then adapter-only checkpoints and the merged weights (the adapter's own
export is `ipu_t5.checkpointing.adapter`).

Everything after injection works on state dicts by name, never on a backend's modules. peft
renames each adapted Linear's weight, `...SelfAttention.q.weight` becoming
`...SelfAttention.q.base_layer.weight`, and adds `...q.lora_A.default.weight` (r x in) and
`...q.lora_B.default.weight` (out x r) beside it. Backends hand weights over by those names; this
module turns them back into Hugging Face names (merged) and into peft's saved-adapter names.
"""
from typing import Callable, Dict, Iterator, Mapping, Optional

import torch

from .errors import UserError

ADAPTER_NAME = "default"
T5_LINEARS = "q, k, v, o (attention), wi_0, wi_1, wo (feed-forward), lm_head"


def enabled(config) -> bool:
    """Whether the run trains peft's adapters (LoRA, or a soft prompt: `ipu_t5.prompt_tuning`)
    instead of every weight: checkpoints then hold only the adapters, the base being the run's
    starting point."""
    return config.peft.method != "none"


def is_lora(config) -> bool:
    """Whether the run's adapters are LoRA's (merged into the export)."""
    return config.peft.method == "lora"


def lora_config(peft_cfg, base_model: Optional[str] = None, inference_mode: bool = False):
    """The `peft.LoraConfig` of the run's `peft` section."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("peft.method=lora needs the peft package: pip install 'peft>=0.13'.") from None
    return LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout,
                      target_modules=list(peft_cfg.target_modules), bias="none", task_type="SEQ_2_SEQ_LM",
                      base_model_name_or_path=base_model, inference_mode=inference_mode)


def apply_lora(model: torch.nn.Module, peft_cfg) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place and freeze everything else.

    The model stays a `T5ForConditionalGeneration` (no PeftModel wrapper), so a backend splits,
    wraps and places it as it does any T5; only the adapted Linear layers change.
    """
    from peft import inject_adapter_in_model

    config = lora_config(peft_cfg)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise UserError("peft.target_modules {} does not name layers of this model ({}). T5's linear "
                        "layers are {}.".format(list(peft_cfg.target_modules), str(err).splitlines()[0],
                                                T5_LINEARS)) from None
    return model


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict name is a LoRA adapter matrix or the soft prompt."""
    return ".lora_A." in name or ".lora_B." in name or name == "prompt_embeddings"


def adapter_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapter tensors of a full state dict: all that a LoRA checkpoint needs to hold."""
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def _merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 on the CPU, in W's dtype."""
    delta = scaling * (b.detach().float().cpu() @ a.detach().float().cpu())
    return (weight.detach().float().cpu() + delta).to(weight.dtype)


def merged_state(state: Dict[str, torch.Tensor], peft_cfg) -> Dict[str, torch.Tensor]:
    """Hugging Face names and plain weights: W + (alpha / r) * B @ A for every adapted layer,
    without adapter tensors. The merged model computes what the adapted model computes in eval
    mode (LoRA dropout is then the identity)."""
    scaling = peft_cfg.lora_alpha / peft_cfg.r
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_adapter_key(k)}
    suffix = ".lora_A.{}.weight".format(ADAPTER_NAME)
    for name, a in state.items():
        if name.endswith(suffix):
            module = name[:-len(suffix)]
            b = state["{}.lora_B.{}.weight".format(module, ADAPTER_NAME)]
            merged[module + ".weight"] = _merge(merged[module + ".weight"], a, b, scaling)
    return merged


class MergedWeights(Mapping):
    """The merged weights of a LoRA run by Hugging Face name, each computed when looked up from its
    base weight (`base(name, shape)`) and the run's `adapters` (peft's names): an export that never
    holds the whole model."""

    def __init__(self, base: Callable[[str, tuple], torch.Tensor], shapes: Dict[str, tuple],
                 adapters: Mapping[str, torch.Tensor], peft_cfg):
        self._base, self._shapes, self._adapters = base, shapes, adapters
        self._scaling = peft_cfg.lora_alpha / peft_cfg.r

    def __getitem__(self, name: str) -> torch.Tensor:
        weight = self._base(name, self._shapes[name])
        module = name[:-len(".weight")]
        a = self._adapters.get("{}.lora_A.{}.weight".format(module, ADAPTER_NAME))
        if a is None:
            return weight
        return _merge(weight, a, self._adapters["{}.lora_B.{}.weight".format(module, ADAPTER_NAME)], self._scaling)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shapes(self) -> Dict[str, tuple]:
        return dict(self._shapes)
