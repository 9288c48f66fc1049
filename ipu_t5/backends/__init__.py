"""Backends: adapters that run the same layout plan on different engines.

Each engine is imported only when its backend is chosen, so the package imports on stacks that
lack it (the Poplar SDK has no torch.distributed.pipelining; nothing else has poptorch).
"""
import importlib
from typing import TYPE_CHECKING, Dict, Tuple, Type

from ..errors import UserError

if TYPE_CHECKING:
    from .base import Backend

# The interface's classes import torch and the data code: loaded on first use, so that resolving a
# backend name (the multi-process launcher does) imports neither.
_LAZY = {"Backend": ".base", "StepResult": ".base"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError("module '{}' has no attribute '{}'".format(__name__, name))


# name -> (module, class), imported on demand.
REGISTRY: Dict[str, Tuple[str, str]] = {
    "single": ("ipu_t5.backends.single", "SingleProcessBackend"),
    "torch": ("ipu_t5.backends.torch_distributed.backend", "TorchPipelineBackend"),
    "ipu": ("ipu_t5.backends.ipu.backend", "IpuBackend"),
}


def resolve_backend_name(config, plan) -> str:
    """`layout.backend`, with `auto` meaning the IPUs when poptorch imports and reports IPU
    hardware, else one process when the layout has one, else the torch.distributed backend."""
    name = config.layout.backend
    if name != "auto":
        return name
    from .ipu.hardware import ipu_hardware_available

    if ipu_hardware_available():
        return "ipu"
    return "single" if plan.world_size == 1 else "torch"


def backend_class(name: str) -> "Type[Backend]":
    """The class of the backend called `name`."""
    if name not in REGISTRY:
        raise UserError("backend '{}' is not available in this installation (available: {}).".format(
            name, ", ".join(sorted(REGISTRY))))
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def create_backend(config, plan) -> "Backend":
    """Build the configured backend for a plan (its `lengths` are the caller's to set)."""
    return backend_class(resolve_backend_name(config, plan))(config, plan)


__all__ = ["Backend", "StepResult", "backend_class", "create_backend", "resolve_backend_name"]
