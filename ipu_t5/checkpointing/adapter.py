"""The adapter's own export: the adapter tensors and a config that `peft` 0.13 (the Poplar SDK's
stack) and today's peft both load with `PeftModel.from_pretrained(base, DIR)`, written atomically
beside the Hugging Face export (LoRA's merged weights, or the base a soft prompt goes with)."""
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import UserError
from ..lora import ADAPTER_NAME, adapter_state, lora_config
from ..prompt_tuning import PROMPT_KEY, prompt_config
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
# PromptTuningConfig fields both peft versions read.
PROMPT_PORTABLE_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "inference_mode", "num_virtual_tokens",
                          "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
                          "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path")

def saved_adapter_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Adapter tensors under the names `PeftModel.save_pretrained` writes (no adapter name)."""
    infix = ".{}.".format(ADAPTER_NAME)
    return {SAVED_PREFIX + k.replace(infix, "."): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter_state(state).items()}


def portable_config_dict(peft_cfg, base_model: Optional[str], hf_config=None) -> Dict[str, Any]:
    """adapter_config.json contents that both stacks' peft load (`hf_config`: the model's, for a
    soft prompt's dimensions)."""
    if peft_cfg.method == "prompt_tuning":
        data, fields = prompt_config(peft_cfg, hf_config, base_model).to_dict(), PROMPT_PORTABLE_FIELDS
    else:
        data, fields = lora_config(peft_cfg, base_model, inference_mode=True).to_dict(), PORTABLE_FIELDS
    out = {}
    for key in fields:
        value = data.get(key)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


def write_adapter(out_dir: Path, state: Dict[str, torch.Tensor], peft_cfg, base_model: Optional[str],
                  tokenizer, hf_config=None) -> Path:
    """Export the adapter where `PeftModel.from_pretrained(base, out_dir)` loads it; atomic. A soft
    prompt is saved as peft saves it: its whole (2 x num_virtual_tokens, d_model) tensor under
    `prompt_embeddings`."""
    from safetensors.torch import save_file

    if peft_cfg.method == "prompt_tuning":
        tensors = {PROMPT_KEY: state[PROMPT_KEY].detach().to("cpu", torch.float32).contiguous()} \
            if PROMPT_KEY in state else {}
    else:
        tensors = saved_adapter_tensors(state)
    if not tensors:
        raise UserError("the model holds no adapter weights to export: was it trained with peft.method={}?".format(
            peft_cfg.method))
    with staged_dir(out_dir) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(staging / ADAPTER_CONFIG, "w") as f:
            json.dump(portable_config_dict(peft_cfg, base_model, hf_config), f, indent=2, sort_keys=True)
        tokenizer.save_pretrained(str(staging))
        (staging / "README.md").write_text(adapter_card(peft_cfg, base_model, len(tensors)))
    return Path(out_dir)


def adapter_card(peft_cfg, base_model: Optional[str], num_tensors: int) -> str:
    """README.md for the adapter export: what it adapts and how to load it."""
    base = base_model or "BASE"
    lines = ["---", "library_name: peft", "tags: [t5, flan-t5, ipu-t5, lora]"]
    if base_model:
        lines.append("base_model: {}".format(base_model))
    if peft_cfg.method == "prompt_tuning":
        lines += ["---", "", "# Soft prompt (prompt tuning) trained with ipu-t5", "",
                  "{} virtual tokens in front of the encoder's input, initialised {}. A soft prompt does not merge: "
                  "load it over its base.".format(peft_cfg.num_virtual_tokens, peft_cfg.prompt_tuning_init), ""]
    else:
        lines += ["---", "", "# LoRA adapter trained with ipu-t5", "",
                  "r={}, alpha={}, dropout={}, on {} ({} tensors).".format(
                      peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, ", ".join(peft_cfg.target_modules),
                      num_tensors), ""]
    if not base_model:
        lines += ["The base model was a seeded random initialisation (the tiny demo), not a saved checkpoint: "
                  "rebuild it with the run's config to apply this adapter.", ""]
    lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForSeq2SeqLM",
              "base = AutoModelForSeq2SeqLM.from_pretrained({!r})".format(base),
              "model = PeftModel.from_pretrained(base, PATH)"]
    if peft_cfg.method == "lora":
        lines.append("merged = model.merge_and_unload()  # a plain T5, as the run's hf/ export")
    lines += ["```", ""]
    return "\n".join(lines)
