"""Weights cut into slices, one parameter per slice, and the references computing modules read
them through (split.py and split_lora.py build on these)."""
from typing import Sequence

import torch


class WeightSlice(torch.nn.Module):
    """One parameter named `weight`: a slice, or a weight one part holds whole."""

    def __init__(self, weight: torch.Tensor, requires_grad: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format),
                                         requires_grad=requires_grad)


class Sliced(torch.nn.Module):
    """A weight cut into `parts` slices along `dim` (as `model.split_like_slices` cuts it: equal
    but for a vocabulary the slices do not divide), each its own parameter (`slices.i.weight`)."""

    def __init__(self, weight: torch.Tensor, parts: int, dim: int):
        super().__init__()
        pieces = torch.tensor_split(weight, parts, dim=dim)
        self.slices = torch.nn.ModuleList([WeightSlice(w, weight.requires_grad) for w in pieces])
        # Where each slice starts along `dim` (a vocabulary slice's first token id).
        self.offsets = [sum(w.shape[dim] for w in pieces[:i]) for i in range(parts)]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.slices[index].weight


class Refs:
    """Weights a computing module reads: kept out of its own parameters, so each weight has one
    name (its Hugging Face path) and one IPU (the module that reads it)."""

    def __init__(self, **sliced: torch.nn.Module):
        self.sliced = sliced

    def __call__(self, name: str, index: int) -> torch.Tensor:
        return self.sliced[name][index]


def added(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of `tensors`, added left to right."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total
