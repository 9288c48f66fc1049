"""float16 numerics that keep a T5 finite: the IPU trains in float16, where T5 overflows.

Large T5 checkpoints produce feed-forward outputs and residual sums past float16's 65504. The
changes below leave the arithmetic the same in exact terms and the state dict untouched (no
parameter is renamed or rescaled), so checkpoints and exports stay plain Hugging Face T5:
- the residual stream between sub-layers is float32: each sub-layer's input is upcast, its
  layer norm (which normalises in float32) hands float16 to the matmuls, and the sub-layer's
  output is added to the float32 stream;
- the feed-forward output projection `wo` multiplies its input by 1/FF_OUTPUT_SCALE and its
  output is scaled back in float32, keeping the float16 accumulation that much below overflow;
- the gated activation entering `wo` is clamped to float16's finite range.
"""
import types

import torch
from transformers.models.t5.modeling_t5 import (T5DenseActDense, T5DenseGatedActDense, T5LayerCrossAttention,
                                                T5LayerFF, T5LayerSelfAttention)

FF_OUTPUT_SCALE = 8.0
FLOAT16_LIMIT = torch.finfo(torch.float16).max


def _float32_stream(module, args):
    # Runs before the sub-layer (and before a placement hook registered after it).
    return (args[0].float(),) + tuple(args[1:])


def _scaled_feed_forward(self, hidden_states):
    if hasattr(self, "wi_0"):
        hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    else:
        hidden = self.act(self.wi(hidden_states))
    hidden = self.dropout(hidden)
    hidden = torch.clamp(hidden, -FLOAT16_LIMIT, FLOAT16_LIMIT).to(self.wo.weight.dtype)
    return self.wo(hidden * (1.0 / FF_OUTPUT_SCALE)).float() * FF_OUTPUT_SCALE


def use_float16_numerics(model: torch.nn.Module) -> None:
    """Make a T5 (any of its modules) safe to run in float16; call before `.half()` and before
    poptorch placement, once per model."""
    for module in model.modules():
        if isinstance(module, (T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF)):
            module.register_forward_pre_hook(_float32_stream)
        elif isinstance(module, (T5DenseGatedActDense, T5DenseActDense)):
            module.forward = types.MethodType(_scaled_feed_forward, module)
