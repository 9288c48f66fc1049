"""AdamW, the learning-rate schedule and the loss, shared by every backend.

The schedule is a pure function of the step, so a resumed or re-split run needs no scheduler
state; every backend sets the rate with `lr_at` before its optimizer step.
"""
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from ..data.batching import IGNORE_INDEX


def lr_at(step: int, config: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or linear decay."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_scheduler_type == "linear":
        remaining = config.max_steps - step
        span = max(1, config.max_steps - config.warmup_steps)
        return config.learning_rate * max(0.0, remaining / span)
    return config.learning_rate


def param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]], weight_decay: float) -> List[Dict]:
    """Decay matrices, not layer-norm scales (as HF's Trainer does)."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw_kwargs(config: TrainingConfig) -> Dict[str, object]:
    """The AdamW hyperparameters, for torch.optim.AdamW and poptorch.optim.AdamW alike."""
    return {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}


def build_optimizer(named_params: Iterable[Tuple[str, torch.nn.Parameter]], config: TrainingConfig) -> torch.optim.Optimizer:
    """torch AdamW over the given parameters; the fused kernel where this torch has one for their
    device (CUDA since torch 2.0, CPU since 2.4), which updates every parameter in one pass."""
    groups = param_groups(named_params, config.weight_decay)
    try:
        # Copies: a refused optimizer has already written its defaults (fused=True) into the groups.
        return torch.optim.AdamW([dict(g) for g in groups], fused=True, **adamw_kwargs(config))
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, **adamw_kwargs(config))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def token_loss(logits: torch.Tensor, labels: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
    """Summed token cross-entropy over the whole global batch's target-token count.

    Each micro-batch's share adds up to the global mean, so the loss and gradients of a step do not
    depend on how the layout splits the batch.
    """
    summed = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / num_target_tokens


def named_optimizer_state(optimizer: torch.optim.Optimizer, named_params: Iterable[Tuple[str, torch.nn.Parameter]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """AdamW state keyed by parameter name instead of position, so another layout can load it."""
    return {name: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
            for name, p in named_params if p in optimizer.state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, named_params: Iterable[Tuple[str, torch.nn.Parameter]],
                               state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """Restore state saved by `named_optimizer_state` for the parameters this optimizer holds."""
    for name, param in named_params:
        if name in state:
            optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) and v.ndim else v)
                                      for k, v in state[name].items()}
