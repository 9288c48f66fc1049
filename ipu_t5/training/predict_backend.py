"""The backend `ipu-t5 predict` generates with, built from the rows it predicts rather than from a
training run's data: the prompts' token lengths size the layout, and the model comes from an export,
a hub id or a checkpoint's tensors, each process building only what it holds."""
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data.features import Lengths, prompt_cap
from ..errors import UserError

# New tokens per row when the data carry no targets and validation.max_new_tokens is unset: a row
# ends earlier at its end-of-sequence token, and its micro-batch when all its rows have.
DEFAULT_MAX_NEW_TOKENS = 64


def max_new_tokens(config, task, rows: List[Dict[str, Any]], tokenizer) -> int:
    """validation.max_new_tokens, else the longest tokenized target (end-of-sequence included)
    where every row has one, else DEFAULT_MAX_NEW_TOKENS."""
    if config.validation.max_new_tokens:
        return config.validation.max_new_tokens
    try:
        targets = [task.target_text(r) for r in rows]
    except (KeyError, ValueError, IndexError, TypeError):
        return DEFAULT_MAX_NEW_TOKENS
    return max(len(ids) for ids in tokenizer(targets)["input_ids"])


def build_backend(config, task, rows: List[Dict[str, Any]], tokenizer, pretrained: Optional[Any] = None,
                  weights: Optional[Any] = None) -> Tuple[Any, int, int]:
    """(the set-up backend, the prompt length cap, new tokens per row)."""
    from ..backends import backend_class, resolve_backend_name
    from ..layout import plan_from_config
    from ..model_source import run_source

    prompt_length = prompt_cap(config.data.max_source_length)
    longest = max(len(ids) for ids in tokenizer([task.source_text(r) for r in rows], truncation=True,
                                                max_length=prompt_length)["input_ids"])
    new_tokens = max_new_tokens(config, task, rows, tokenizer)
    backend_type = backend_class(resolve_backend_name(config, plan_from_config(config)))
    if backend_type.static_prompt_length:
        raise UserError("ipu-t5 predict runs on the single and torch backends (--backend single|torch); the IPU "
                        "backend compiles static shapes for training runs only.")
    lengths = Lengths(source=longest, target=new_tokens, static_source=longest)
    plan = backend_type.layout_plan(config, lengths)
    backend = backend_type(config, plan)
    backend.lengths = lengths
    source = run_source(config, len(tokenizer), backend, pretrained, weights)
    torch.manual_seed(config.training.seed)
    backend.setup(source)
    return backend, prompt_length, new_tokens
