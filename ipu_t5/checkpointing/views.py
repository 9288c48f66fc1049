"""A checkpoint's tensors as lazy mappings: each tensor is read from disk when it is looked up, so a
process that holds part of the model reads only its part."""
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import torch

from . import dcp


class SafetensorsView(Mapping):
    """A safetensors file as a mapping whose tensors are read from disk when looked up, so a
    process that holds part of the model reads only its part. `aliases` maps extra names to
    stored ones (T5's tied embeddings)."""

    def __init__(self, path: Path, aliases: Optional[Dict[str, str]] = None):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._aliases = {k: v for k, v in (aliases or {}).items() if v in self._file.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        if stored not in self._file.keys():
            raise KeyError(name)
        return self._file.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._file.keys()) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._file.keys()) + len(self._aliases)

    def shapes(self) -> Dict[str, tuple]:
        """Stored tensor shapes by name, from the header alone."""
        return {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}


class DcpView(Mapping):
    """The tensors under `prefix` in a torch.distributed.checkpoint directory, read one name at a
    time (a single process reading what several wrote)."""

    def __init__(self, path: Path, prefix: str, aliases: Optional[Dict[str, str]] = None):
        self._path = path
        self._prefix = prefix
        self._meta = {k[len(prefix):]: v for k, v in dcp.metadata(path).items() if k.startswith(prefix)}
        self._aliases = {k: v for k, v in (aliases or {}).items() if v in self._meta}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        if stored not in self._meta:
            raise KeyError(name)
        shape, dtype = self._meta[stored]
        template = {self._prefix + stored: torch.empty(shape, dtype=dtype)}
        dcp.transfer("load", template, self._path)
        return template[self._prefix + stored]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._meta) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._meta) + len(self._aliases)

    def shapes(self) -> Dict[str, tuple]:
        return {k: tuple(shape) for k, (shape, _) in self._meta.items()}


class OptimizerView(Mapping):
    """Flat `name.field` tensors seen as {name: {field: tensor}}, read when looked up."""

    def __init__(self, flat: Mapping[str, torch.Tensor]):
        self._flat = flat
        self._fields: Dict[str, List[str]] = {}
        for key in flat:
            name, _, field = key.rpartition(".")
            self._fields.setdefault(name, []).append(field)

    def __getitem__(self, name: str) -> Dict[str, torch.Tensor]:
        return {f: self._flat["{}.{}".format(name, f)] for f in self._fields[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


