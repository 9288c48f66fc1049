"""Faster kernels swapped into a Hugging Face T5 for training on the torch backends.

Flan-T5's gated-GELU feed-forward uses transformers' `gelu_new`: the tanh approximation of GELU
written as seven element-wise tensor operations, each a pass over the feed-forward activations
and a saved tensor for backward. torch has the same formula as one fused kernel
(`F.gelu(approximate="tanh")`, transformers' `gelu_pytorch_tanh`): measured here it makes a
training step 8% (flan-t5-small shape) to 16% (tiny) faster on a CPU. The two round differently
(logits differ by up to 2e-5 on torch 2.0.1), so the fused kernel serves training only: in eval
mode (validation, generation, the export's parity check) the model computes exactly what plain
transformers computes from its export, which still names `gelu_new`.
"""
import torch


class TrainingFusedGELU(torch.nn.Module):
    """`gelu_new` in eval mode, torch's fused tanh-GELU (the same formula) in training mode."""

    def __init__(self, exact: torch.nn.Module):
        super().__init__()
        self.exact = exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.nn.functional.gelu(x, approximate="tanh")
        return self.exact(x)


def fuse_gelu(model: torch.nn.Module) -> int:
    """Give every `gelu_new` activation of `model` the fused kernel for training; returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = TrainingFusedGELU(module.act)
            swapped += 1
    return swapped
