"""Everything that differs between transformers 4.x (the Poplar SDK's 4.46.3) and 5.x.

Kept in one place so the rest of the package reads the same on both stacks.
"""
from typing import Any, Dict

import torch
import transformers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def dtype_kwarg(dtype: torch.dtype) -> Dict[str, Any]:
    """The `from_pretrained` keyword that sets the load dtype (renamed in 5.x)."""
    return {"dtype": dtype} if TRANSFORMERS_MAJOR >= 5 else {"torch_dtype": dtype}


def lm_head_is_tied(model: torch.nn.Module) -> bool:
    """Whether the LM head shares the embedding's storage."""
    return model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give the LM head its own matrix, as every Flan-T5 has.

    transformers 5.x ties T5's head to the shared embedding whatever the config says, so a model
    built from a config starts tied; 4.x honours `tie_word_embeddings=False`. A fresh matrix is
    initialised at d_model**-0.5, so a fresh model starts near uniform over the vocabulary.
    """
    if not lm_head_is_tied(model):
        return
    weight = torch.empty_like(model.shared.weight)
    torch.nn.init.normal_(weight, mean=0.0, std=model.config.initializer_factor * model.config.d_model ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)
    # Otherwise 5.x's save/load machinery re-ties them.
    model.config.tie_word_embeddings = False


def export_config_dict(config: transformers.PretrainedConfig, dtype: torch.dtype) -> Dict[str, Any]:
    """config.json contents that both stacks read as an untied Flan-T5.

    5.x writes `tie_word_embeddings: true` for every T5 and keeps the untied meaning in
    `scale_decoder_outputs`; 4.x reads `true` as "tie the head and scale the decoder output" and
    silently produces garbage. Writing `false` makes both load the same model.
    """
    data = config.to_dict()
    data["tie_word_embeddings"] = False
    data.pop("scale_decoder_outputs", None)
    name = str(dtype).replace("torch.", "")
    data["torch_dtype"] = name
    data["dtype"] = name
    data["architectures"] = ["T5ForConditionalGeneration"]
    return data


def load_sentencepiece_tokenizer(directory: str) -> transformers.PreTrainedTokenizerBase:
    """Wrap a directory holding a T5 `spiece.model` as a Hugging Face tokenizer.

    5.x's `T5Tokenizer` is the fast, tokenizers-backed class; in 4.x that is `T5TokenizerFast`.
    Building either by hand from `vocab_file=` was seen to map every piece to <unk>, so load
    from the directory.
    """
    cls = transformers.T5Tokenizer if TRANSFORMERS_MAJOR >= 5 else transformers.T5TokenizerFast
    return cls.from_pretrained(directory, extra_ids=0, legacy=False)


def scales_decoder_output(config: transformers.PretrainedConfig) -> bool:
    """Whether T5 multiplies the decoder output by d_model**-0.5 before its LM head: the tied head
    of the original T5, never Flan-T5. 5.x spells it `scale_decoder_outputs`; 4.x infers it from
    `tie_word_embeddings`."""
    if TRANSFORMERS_MAJOR >= 5:
        return bool(getattr(config, "scale_decoder_outputs", False))
    return bool(config.tie_word_embeddings)
