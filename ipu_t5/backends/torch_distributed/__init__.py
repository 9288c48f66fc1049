"""The layout on torch.distributed: pipeline stages (`torch.distributed.pipelining`, imported only
in this folder, with FSDP2) x data-parallel replicas, one process each, launched by torchrun.
Needs torch 2.6 or newer; `launch` alone is imported by the CLI on every stack."""
