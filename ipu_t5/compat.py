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


def decoder_output_scale(config: transformers.PretrainedConfig) -> float:
    """The factor T5 applies to the decoder output before the LM head: d_model**-0.5 for a head
    tied to the embedding, 1 for Flan-T5's own head. 5.x keeps the flag in `scale_decoder_outputs`,
    4.x reads `tie_word_embeddings`."""
    scaled = getattr(config, "scale_decoder_outputs", False) if TRANSFORMERS_MAJOR >= 5 else config.tie_word_embeddings
    return config.d_model ** -0.5 if scaled else 1.0
