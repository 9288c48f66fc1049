"""Soft prompts (prompt tuning) as `peft` computes them for a seq2seq model, the base frozen.

peft's `PromptTuningConfig(task_type=SEQ_2_SEQ_LM)` sets `num_transformer_submodules=2`, so its
`prompt_embeddings` tensor has 2 x num_virtual_tokens rows, but `PeftModelForSeq2SeqLM` only ever
prepends the first num_virtual_tokens of them to the encoder's input embeddings (the decoder is
untouched), and grows the encoder attention mask by as many ones at the front; `generate` does the
same. This module holds that tensor under the name `prompt_embeddings` (peft's saved name) beside
T5's own parameters, whose Hugging Face names stay unchanged, and does that prepending: for one
process through `PromptTunedT5`, for the torch.distributed pipeline in the embedding's stage
(`stages.StageChunk`), with `extend_mask` for every stage downstream.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

# peft's saved name of the soft prompt (adapter_model.safetensors) and ours in the model.
PROMPT_KEY = "prompt_embeddings"
# peft's num_transformer_submodules for an encoder-decoder: the tensor's rows per virtual token.
SEQ2SEQ_SUBMODULES = 2


def enabled(config) -> bool:
    """Whether the run trains a soft prompt instead of any weight."""
    return config.peft.method == "prompt_tuning"


def virtual_tokens(config) -> int:
    """Positions the soft prompt adds in front of every prompt (0 without prompt tuning)."""
    return config.peft.num_virtual_tokens if enabled(config) else 0


def init_ids(token_ids: Sequence[int], rows: int) -> List[int]:
    """peft's text initialisation: the tokenized text repeated, then cut, to `rows` ids."""
    ids = list(token_ids)
    return (ids * math.ceil(rows / len(ids)))[:rows]


def extend_mask(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The encoder attention mask with `count` ones in front (the virtual tokens' positions)."""
    if not count:
        return mask
    return torch.cat([torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device), mask], dim=1)


def prepend(prompt: torch.Tensor, count: int, embedded: torch.Tensor) -> torch.Tensor:
    """The first `count` rows of the soft prompt in front of every row's input embeddings."""
    rows = prompt[:count].unsqueeze(0).expand(embedded.shape[0], -1, -1).to(embedded.dtype)
    return torch.cat([rows, embedded], dim=1)


class PromptTunedT5(nn.Module):
    """A T5ForConditionalGeneration with a trainable soft prompt in front of its encoder input.

    T5's children are this module's children under their own names (so parameter names, state dicts
    and checkpoints keep Hugging Face's, plus `prompt_embeddings`); `forward` and `generate` take
    input ids as T5's do and call T5 with the prompted input embeddings and the grown mask.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        # T5 itself, unregistered: its children are ours already.
        object.__setattr__(self, "t5", model)
        self.config = model.config
        self.num_virtual_tokens = num_virtual_tokens
        for param in model.parameters():
            param.requires_grad_(False)
        device = model.shared.weight.device
        self.prompt_embeddings = nn.Parameter(torch.empty(SEQ2SEQ_SUBMODULES * num_virtual_tokens,
                                                          model.config.d_model, device=device))

    def train(self, mode: bool = True) -> "PromptTunedT5":
        self.t5.train(mode)
        return super().train(mode)

    def _prompted(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        embeds = prepend(self.prompt_embeddings, self.num_virtual_tokens, self.shared(input_ids))
        mask = None if attention_mask is None else extend_mask(attention_mask, self.num_virtual_tokens)
        return embeds, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        embeds, mask = self._prompted(input_ids, attention_mask)
        return self.t5(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        embeds, mask = self._prompted(input_ids, attention_mask)
        return self.t5.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def apply_prompt_tuning(model: nn.Module, peft_cfg) -> PromptTunedT5:
    """`model` wrapped with a soft prompt of `peft_cfg.num_virtual_tokens` (its values are set by
    whoever materialises the model: `ModelSource.tensor`)."""
    return PromptTunedT5(model, peft_cfg.num_virtual_tokens)


def prompt_config(peft_cfg, hf_config, base_model: Optional[str], inference_mode: bool = True):
    """The `peft.PromptTuningConfig` of the run (for an encoder-decoder: two submodules)."""
    from peft import PromptTuningConfig

    text = peft_cfg.prompt_tuning_init == "text"
    return PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=peft_cfg.num_virtual_tokens, token_dim=hf_config.d_model,
        num_transformer_submodules=SEQ2SEQ_SUBMODULES, num_attention_heads=hf_config.num_heads,
        num_layers=hf_config.num_layers, prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=peft_cfg.prompt_tuning_init_text if text else None,
        tokenizer_name_or_path=base_model if text else None, base_model_name_or_path=base_model,
        inference_mode=inference_mode)
