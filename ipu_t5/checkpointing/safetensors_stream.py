"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` takes every tensor of a file at once, so a 5 GB shard (or a whole
model under one file) would sit in memory before a byte is written. The format is a length-prefixed
JSON header of names, dtypes, shapes and byte offsets, then the tensors' bytes back to back
(https://github.com/huggingface/safetensors#format): with the shapes known up front the header is
written first and each tensor's bytes follow as it is produced. Files are read with the safetensors
library itself (which validates the header and offsets).
"""
import json
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _header(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], metadata: Optional[Dict[str, str]]) -> bytes:
    """The length prefix and JSON header of a file holding `entries` (name, dtype, shape) in order."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The library aligns the data to 8 bytes by padding the header with spaces; so does this.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _write_bytes(f: BinaryIO, value: torch.Tensor) -> None:
    f.write(value.reshape(-1).view(torch.uint8).numpy())


def write_streamed(path: Path, names: Sequence[str], shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype,
                   tensor: Callable[[str], torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `names` (all of `dtype`, shaped as `shapes` says) to `path`, asking `tensor(name)` for
    each one's values in turn and keeping none of them."""
    with open(str(path), "wb") as f:
        f.write(_header([(name, dtype, tuple(shapes[name])) for name in names], metadata))
        for name in names:
            value = tensor(name).detach().to("cpu", dtype).contiguous()
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError("{} has shape {}, {} was announced".format(name, tuple(value.shape), shapes[name]))
            _write_bytes(f, value)
            del value


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file` into an open binary stream: `tensors` (host, contiguous) in
    the library's order, widest item first (every tensor's bytes stay aligned to its item size),
    then by name."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    f.write(_header([(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names], metadata))
    for name in names:
        _write_bytes(f, tensors[name])
