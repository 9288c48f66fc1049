"""Random-number generator states of one process, as JSON, so a resumed run draws the same
dropout masks (and anything else random) as the run it continues."""
import base64
import random
from typing import Any, Dict

import numpy as np
import torch


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(bytes(tensor.tolist())).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)


def capture() -> Dict[str, Any]:
    """Python's, numpy's, torch's CPU and every CUDA device's generator state."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _encode(torch.get_rng_state()),
        "cuda": [_encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore(state: Dict[str, Any]) -> None:
    """Put back what `capture` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode(state["torch"]))
    # Saved on another machine with a different GPU count: the CUDA streams cannot be matched.
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])
