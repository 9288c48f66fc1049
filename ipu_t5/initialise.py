"""Random initialisation by parameter name: every weight drawn from its own generator, seeded by the
run's seed and the weight's Hugging Face name, with Flan-T5's distributions.

A process that holds one pipeline stage draws exactly the values one process drawing the whole model
draws for those names, whatever the layout, the backend or the order of construction, so one process
and every split start from the same weights, bit for bit.

The distributions are transformers' `T5PreTrainedModel._init_weights` (`factor` is the config's
`initializer_factor`), with one departure: the untied LM head is drawn at `d_model ** -0.5`, as
`compat.untie_lm_head` does, rather than transformers' 1.0 (with a unit-scale head a fresh model's
first logits have a standard deviation of sqrt(d_model), far from the near-uniform prediction a
fine-tuning run starts best from). LoRA adapters start as peft starts them: A uniform in
+-1/sqrt(in_features) (`kaiming_uniform_(a=sqrt(5))`), B at zero, so the adapted model computes the
base model's function.
"""
import hashlib
from typing import Tuple

import torch

# peft's names for an adapted layer's pieces; the base weight is named as the plain layer's was.
LORA_BASE = ".base_layer."


def hf_name(name: str) -> str:
    """The plain Hugging Face name of a parameter of a LoRA-adapted model (`...q.base_layer.weight`
    -> `...q.weight`); other names unchanged."""
    return name.replace(LORA_BASE, ".")


def seed_of(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a parameter name."""
    digest = hashlib.sha256("{}/{}".format(seed, name).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def distribution(name: str, hf_config) -> Tuple[str, float]:
    """("normal", std), ("uniform", bound), ("constant", value) for the parameter `name`."""
    factor = hf_config.initializer_factor
    d_model, d_kv, heads = hf_config.d_model, hf_config.d_kv, hf_config.num_heads
    plain = hf_name(name)
    leaf = plain.split(".")
    if ".lora_A." in plain:
        return "uniform", None  # the bound depends on the shape: see `initial_tensor`
    if ".lora_B." in plain:
        return "constant", 0.0
    if plain == "prompt_embeddings":
        return "normal", 1.0  # peft's soft prompt is an nn.Embedding: its default draw
    if plain in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return "normal", factor * 1.0
    if plain == "lm_head.weight":
        return "normal", factor * d_model ** -0.5
    if plain.endswith("layer_norm.weight"):
        return "constant", factor * 1.0
    if plain.endswith("relative_attention_bias.weight"):
        return "normal", factor * d_model ** -0.5
    if len(leaf) >= 3 and leaf[-3] in ("SelfAttention", "EncDecAttention"):
        return "normal", factor * {"q": (d_model * d_kv) ** -0.5, "k": d_model ** -0.5, "v": d_model ** -0.5,
                                   "o": (heads * d_kv) ** -0.5}[leaf[-2]]
    if len(leaf) >= 3 and leaf[-3] == "DenseReluDense":
        return "normal", factor * (hf_config.d_ff ** -0.5 if leaf[-2] == "wo" else d_model ** -0.5)
    raise ValueError("no initialisation is defined for parameter '{}'".format(name))


def initial_tensor(name: str, shape: Tuple[int, ...], hf_config, seed: int) -> torch.Tensor:
    """The float32 CPU tensor parameter `name` starts from under the run's `seed`."""
    kind, value = distribution(name, hf_config)
    tensor = torch.empty(tuple(shape), dtype=torch.float32)
    if kind == "constant":
        return tensor.fill_(value)
    generator = torch.Generator().manual_seed(seed_of(seed, hf_name(name)))
    if kind == "normal":
        return tensor.normal_(0.0, value, generator=generator)
    bound = 1.0 / shape[1] ** 0.5
    return tensor.uniform_(-bound, bound, generator=generator)
