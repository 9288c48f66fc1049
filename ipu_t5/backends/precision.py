"""Which precision the torch backends compute in: bfloat16 autocast where the device multiplies in
bfloat16 natively, float32 elsewhere.

Under autocast the matrix products run in bfloat16 while the weights, AdamW's moments, the
residual stream between blocks, the layer norms and the loss stay float32. A GPU with bfloat16
(A100, H100) and a CPU with AVX512-BF16 or AMX multiply bfloat16 at two or more times their
float32 rate (this project's 2-core AMD EPYC: 385 to 419 GFLOP/s against 147 to 170 at T5's
shapes). Where a CPU has neither, oneDNN converts bfloat16 in software, no faster than float32,
so float32 stays the default there. The CPU is asked through torch's own report of its instruction sets
(cpuinfo, as oneDNN picks its kernels), never by its name.
"""
from typing import Optional

import torch


def cpu_multiplies_bf16() -> Optional[bool]:
    """Whether torch reports AVX512-BF16 or AMX on this CPU; None where this torch cannot tell
    (torch 2.0.1, the Poplar SDK's, has neither probe)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    if not probes:
        return None
    return any(bool(probe()) for probe in probes)


def default_bf16(device: torch.device) -> bool:
    """bfloat16 autocast by default: on GPUs that have it and CPUs that multiply in it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_multiplies_bf16())


def autocast_dtype(bf16: Optional[bool], device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 where asked, or by default where the device multiplies in it; None means float32."""
    if bf16 is None:
        bf16 = default_bf16(device)
    return torch.bfloat16 if bf16 else None


def eval_autocast_dtype(validation_bf16: Optional[bool], training_dtype: Optional[torch.dtype]):
    """Generation's precision: `validation.bf16` where set, else the training's (see docs/speed.md
    for the measured accuracy and speed)."""
    if validation_bf16 is None:
        return training_dtype
    return torch.bfloat16 if validation_bf16 else None


def precision_phrase(amp_dtype: Optional[torch.dtype], eval_dtype: Optional[torch.dtype], bf16: Optional[bool],
                     device: torch.device) -> str:
    """How a backend describes its precision, with the reason where a CPU's default stays float32
    because this torch cannot say what the CPU multiplies in."""
    phrase = "bf16 autocast" if amp_dtype is not None else "fp32"
    if eval_dtype != amp_dtype:
        phrase += ", validation in " + ("bf16 autocast" if eval_dtype is not None else "fp32")
    if bf16 is None and amp_dtype is None and device.type == "cpu" and cpu_multiplies_bf16() is None:
        phrase += ": torch {} cannot tell whether this CPU multiplies in bfloat16, so it runs float32 " \
                  "(training.bf16=true autocasts)".format(torch.__version__)
    return phrase
