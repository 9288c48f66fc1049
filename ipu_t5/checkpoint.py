"""Training checkpoints, stored by parameter name so any layout can load them.

A checkpoint directory holds model.safetensors (full weights), optimizer.pt (AdamW state by
name), trainer_state.json (step, data order), config.yaml, model_config.json and the tokenizer.
It is written to a temporary name and renamed, so a crash never leaves one that looks complete.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml

from .compat import export_config_dict
from .errors import UserError

COMPLETE = "trainer_state.json"


def save_checkpoint(path: Path, model_state: Dict[str, torch.Tensor], optimizer_state: Optional[Dict],
                    trainer_state: Dict[str, Any], run_config: Dict[str, Any], hf_config, tokenizer) -> Path:
    """Write a checkpoint atomically at `path`."""
    from safetensors.torch import save_file

    from .export import _replace_dir, export_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".{}.".format(path.name), dir=str(path.parent)))
    try:
        save_file(export_tensors(model_state, torch.float32), str(staging / "model.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, str(staging / "optimizer.pt"))
        (staging / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        with open(staging / "model_config.json", "w") as f:
            json.dump(export_config_dict(hf_config, torch.float32), f, indent=2)
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        # Written last: its presence marks the checkpoint complete.
        with open(staging / COMPLETE, "w") as f:
            json.dump(trainer_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(staging, path)
    finally:
        shutil.rmtree(str(staging), ignore_errors=True)
    return path


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint's parts: model state, optimizer state, trainer state, configs, tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5Config

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError("'{}' is not a complete ipu-t5 checkpoint (no {}): give a checkpoint directory "
                        "such as <output-dir>/checkpoints/step-N.".format(path, COMPLETE))
    state = load_file(str(path / "model.safetensors"))
    if "shared.weight" in state:  # a LoRA checkpoint holds adapters only
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
        state["decoder.embed_tokens.weight"] = state["shared.weight"]
    optimizer = path / "optimizer.pt"
    return {
        "model": state,
        "optimizer": torch.load(str(optimizer)) if optimizer.is_file() else None,
        "trainer_state": json.loads((path / COMPLETE).read_text()),
        "run_config": yaml.safe_load((path / "config.yaml").read_text()),
        "hf_config": T5Config.from_json_file(str(path / "model_config.json")),
        "tokenizer": AutoTokenizer.from_pretrained(str(path / "tokenizer")),
    }
