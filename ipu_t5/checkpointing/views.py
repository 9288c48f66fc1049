"""A checkpoint's tensors as lazy mappings: each tensor is read from disk when it is looked up, so a
process that holds part of the model reads only its part."""
import json
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from . import dcp

# What `save_pretrained` writes: one file, or shards listed by an index.
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


class SafetensorsView(Mapping):
    """One safetensors file, or a sharded set, as a mapping whose tensors are read from disk one at a
    time when looked up, so a process that holds part of the model reads only its part. Each read
    opens its file and closes it again: no file stays mapped into the process. `aliases` maps extra
    names to stored ones (T5's tied embeddings)."""

    def __init__(self, paths: Union[Path, Sequence[Path]], aliases: Optional[Dict[str, str]] = None):
        from safetensors import safe_open

        self._where: Dict[str, str] = {}
        self._shapes: Dict[str, tuple] = {}
        for path in ([paths] if isinstance(paths, (str, Path)) else paths):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self._where[name] = str(path)
                    self._shapes[name] = tuple(f.get_slice(name).get_shape())
        self._aliases = {k: v for k, v in (aliases or {}).items() if v in self._where and k not in self._where}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        stored = self._aliases.get(name, name)
        if stored not in self._where:
            raise KeyError(name)
        with safe_open(self._where[stored], framework="pt") as f:
            return f.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._where) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._aliases

    def shapes(self) -> Dict[str, tuple]:
        """Tensor shapes by name (aliases included), from the headers alone."""
        return dict(self._shapes, **{k: self._shapes[v] for k, v in self._aliases.items()})


def weight_files(directory: Path) -> List[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (an index's shards, or the one
    file); empty when it has none."""
    directory = Path(directory)
    if (directory / HF_INDEX).is_file():
        index = json.loads((directory / HF_INDEX).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    return [directory / HF_WEIGHTS] if (directory / HF_WEIGHTS).is_file() else []


class DcpView(Mapping):
    """The tensors under `prefix` in a torch.distributed.checkpoint directory, read one name at a
    time by this process alone (a single process reading what several wrote, or one rank reading
    only its own names while the others read theirs)."""

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
        dcp.transfer("load", template, self._path, alone=True)
        return template[self._prefix + stored]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._meta) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._meta) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._meta or name in self._aliases

    def shapes(self) -> Dict[str, tuple]:
        """Tensor shapes by name (aliases included), from the metadata alone."""
        found = {k: tuple(shape) for k, (shape, _) in self._meta.items()}
        return dict(found, **{k: found[v] for k, v in self._aliases.items()})


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

    def __contains__(self, name: object) -> bool:
        return name in self._fields
