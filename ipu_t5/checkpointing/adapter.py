"""The LoRA adapter's own export: the adapter tensors and a config that `peft` 0.13 (the Poplar SDK's
stack) and today's peft both load with `PeftModel.from_pretrained(base, DIR)`, written atomically
beside the merged Hugging Face export."""
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import UserError
from ..lora import ADAPTER_NAME, adapter_state, lora_config
from .atomic import staged_dir

# How PeftModel.save_pretrained names a seq2seq model's adapter tensors.
SAVED_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# LoraConfig fields that peft 0.13 (the Poplar SDK's stack) and today's peft both read; newer peft
# writes fields 0.13 rejects, so the adapter config holds only these and both load it.
PORTABLE_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "lora_alpha",
                   "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "modules_to_save",
                   "init_lora_weights")

def saved_adapter_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Adapter tensors under the names `PeftModel.save_pretrained` writes (no adapter name)."""
    infix = ".{}.".format(ADAPTER_NAME)
    return {SAVED_PREFIX + k.replace(infix, "."): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter_state(state).items()}


def portable_config_dict(peft_cfg, base_model: Optional[str]) -> Dict[str, Any]:
    """adapter_config.json contents that both stacks' peft load."""
    data = lora_config(peft_cfg, base_model, inference_mode=True).to_dict()
    out = {}
    for key in PORTABLE_FIELDS:
        value = data.get(key)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


def write_adapter(out_dir: Path, state: Dict[str, torch.Tensor], peft_cfg, base_model: Optional[str],
                  tokenizer) -> Path:
    """Export the adapter where `PeftModel.from_pretrained(base, out_dir)` loads it; atomic."""
    from safetensors.torch import save_file

    tensors = saved_adapter_tensors(state)
    if not tensors:
        raise UserError("the model holds no LoRA adapter weights to export: was it trained with peft.method=lora?")
    with staged_dir(out_dir) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(staging / ADAPTER_CONFIG, "w") as f:
            json.dump(portable_config_dict(peft_cfg, base_model), f, indent=2, sort_keys=True)
        tokenizer.save_pretrained(str(staging))
        (staging / "README.md").write_text(adapter_card(peft_cfg, base_model, len(tensors)))
    return Path(out_dir)


def adapter_card(peft_cfg, base_model: Optional[str], num_tensors: int) -> str:
    """README.md for the adapter export: what it adapts and how to load it."""
    base = base_model or "BASE"
    lines = ["---", "library_name: peft", "tags: [t5, flan-t5, ipu-t5, lora]"]
    if base_model:
        lines.append("base_model: {}".format(base_model))
    lines += ["---", "", "# LoRA adapter trained with ipu-t5", "",
              "r={}, alpha={}, dropout={}, on {} ({} tensors).".format(
                  peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, ", ".join(peft_cfg.target_modules),
                  num_tensors), ""]
    if not base_model:
        lines += ["The base model was a seeded random initialisation (the tiny demo), not a saved checkpoint: "
                  "rebuild it with the run's config to apply this adapter.", ""]
    lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForSeq2SeqLM",
              "base = AutoModelForSeq2SeqLM.from_pretrained({!r})".format(base),
              "model = PeftModel.from_pretrained(base, PATH)",
              "merged = model.merge_and_unload()  # a plain T5, as the run's hf/ export", "```", ""]
    return "\n".join(lines)
