"""Graphcore IPUs through poptorch: the backend (the only place poptorch is imported, lazily), T5
arranged for poptorch's blocks and phases, float16 numerics, the per-IPU plan and memory
arithmetic (no IPU needed), and optimum-graphcore's `ipu_config.json`."""
