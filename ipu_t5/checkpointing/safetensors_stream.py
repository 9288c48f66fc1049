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
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_streamed(path: Path, names: Sequence[str], shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype,
                   tensor: Callable[[str], torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `names` (all of `dtype`, shaped as `shapes` says) to `path`, asking `tensor(name)` for
    each one's values in turn and keeping none of them."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        size = int(torch.Size(shapes[name]).numel()) * itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The library aligns the data to 8 bytes by padding the header with spaces; so does this.
    encoded += b" " * (-len(encoded) % 8)
    with open(str(path), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            value = tensor(name).detach().to("cpu", dtype).contiguous()
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError("{} has shape {}, {} was announced".format(name, tuple(value.shape), shapes[name]))
            f.write(value.reshape(-1).view(torch.uint8).numpy())
            del value
