"""The Flan-T5 size registry, per-block cost arithmetic, and model construction.

The registry holds each size's dimensions, so a layout or memory plan for XXL needs no weights.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .errors import UserError

# Tied to `shared.weight`; Hugging Face checkpoints store only the shared copy.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclass(frozen=True)
class ModelSize:
    """One Flan-T5 size: hub id, preset name, and the dimensions of its config.json."""

    name: str
    hub_id: Optional[str]
    preset: str
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def block_names(self) -> List[str]:
        """Encoder then decoder blocks, in the order a pipeline visits them."""
        return ["encoder.{}".format(i) for i in range(self.num_layers)] + \
            ["decoder.{}".format(i) for i in range(self.num_decoder_layers)]

    def t5_config_kwargs(self) -> Dict[str, object]:
        """Keyword arguments for `transformers.T5Config` in Flan-T5's architecture."""
        return dict(
            vocab_size=self.vocab_size, d_model=self.d_model, d_ff=self.d_ff, d_kv=self.d_kv,
            num_heads=self.num_heads, num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, layer_norm_epsilon=1e-6, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )

    def block_params(self, name: str) -> int:
        """Parameters of one named part: `encoder.i`, `decoder.i`, `embedding`, `lm_head`,
        `encoder.final_layer_norm` or `decoder.final_layer_norm`."""
        d, attn = self.d_model, 4 * self.d_model * self.inner_dim
        ff = 3 * d * self.d_ff  # gated-gelu: wi_0, wi_1, wo
        bias = self.relative_attention_num_buckets * self.num_heads
        if name in ("embedding", "lm_head"):
            return self.vocab_size * d
        if name.endswith("final_layer_norm"):
            return d
        stack, index = name.split(".")
        if stack == "encoder":
            return attn + ff + 2 * d + (bias if index == "0" else 0)
        return 2 * attn + ff + 3 * d + (bias if index == "0" else 0)

    def block_flops(self, name: str, source_len: int, target_len: int) -> float:
        """Forward FLOPs of one part for one sample (matmuls and attention scores)."""
        if name == "embedding":
            return 0.0
        if name == "lm_head":
            return 2.0 * self.vocab_size * self.d_model * target_len
        if name.endswith("final_layer_norm"):
            return 0.0
        return float(sum(self.sublayer_flops(name, source_len, target_len)))

    def sublayer_flops(self, name: str, source_len: int, target_len: int) -> List[float]:
        """Forward FLOPs of each sublayer of block `encoder.i` or `decoder.i` for one sample, in
        order: self-attention, cross-attention (decoder only), feed-forward."""
        d, inner = self.d_model, self.inner_dim
        ff = 2 * 3 * d * self.d_ff
        if name.startswith("encoder."):
            s = source_len
            return [s * 2 * 4 * d * inner + 2 * 2 * s * s * inner, s * ff]
        t, s = target_len, source_len
        self_attn = t * 2 * 4 * d * inner + 2 * 2 * t * t * inner
        cross = t * 2 * 2 * d * inner + s * 2 * 2 * d * inner + 2 * 2 * t * s * inner
        return [self_attn, cross, t * ff]

    def total_params(self) -> int:
        parts = ["embedding", "lm_head", "encoder.final_layer_norm", "decoder.final_layer_norm"]
        return sum(self.block_params(n) for n in parts + self.block_names)


SIZES = {
    s.name: s
    for s in [
        # Flan-T5's architecture at a size a CPU trains in seconds; vocabulary from the demo tokenizer.
        ModelSize("tiny", None, "tiny", 128, 256, 4, 32, 2, 2, vocab_size=512),
        ModelSize("small", "google/flan-t5-small", "flan-t5-small", 512, 1024, 6, 64, 8, 8),
        ModelSize("base", "google/flan-t5-base", "flan-t5-base", 768, 2048, 12, 64, 12, 12),
        ModelSize("large", "google/flan-t5-large", "flan-t5-large", 1024, 2816, 16, 64, 24, 24),
        ModelSize("xl", "google/flan-t5-xl", "flan-t5-xl", 2048, 5120, 32, 64, 24, 24),
        ModelSize("xxl", "google/flan-t5-xxl", "flan-t5-xxl", 4096, 10240, 64, 64, 24, 24),
    ]
}


def canonical_size(name: str) -> ModelSize:
    """Look a size up by short name (`xl`), preset (`flan-t5-xl`) or hub id (`google/flan-t5-xl`)."""
    key = name.lower().replace("google/", "").replace("flan-t5-", "")
    if key not in SIZES:
        import difflib

        close = difflib.get_close_matches(key, list(SIZES), n=1)
        hint = " Did you mean '{}'?".format(close[0]) if close else ""
        raise UserError("unknown model '{}'. Known sizes: {}.{} (For other weights keep a size and "
                        "set model.pretrained=PATH.)".format(name, ", ".join(SIZES), hint))
    return SIZES[key]


def refuse_training_checkpoint(source: str) -> None:
    """A training checkpoint given where Hugging Face weights belong gets a pointer to what works."""
    if (Path(source).expanduser() / "trainer_state.json").is_file():
        raise UserError("'{}' is an ipu-t5 training checkpoint, not Hugging Face weights: continue its run with "
                        "--resume {}, or export it (ipu-t5 export {} --out DIR) and start from DIR.".format(
                            source, source, source))


def set_dropout(model, rate: float) -> None:
    """Set every dropout of a T5 (and its config, so an export records it)."""
    import torch

    model.config.dropout_rate = rate
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):
            # T5Attention copies the rate into a float for its attention-weight dropout.
            module.dropout = rate


def model_from_config(hf_config, device: Optional[str] = None):
    """A Flan-T5 (untied LM head) of `hf_config`'s architecture, randomly initialised; on the
    "meta" device it allocates nothing (for shape checks, or as a frame for `with_weights`)."""
    import copy

    import torch
    from transformers import T5ForConditionalGeneration

    from .compat import untie_lm_head

    with torch.device(device or "cpu"):
        model = T5ForConditionalGeneration(copy.deepcopy(hf_config))
        untie_lm_head(model)
    return model


def parameter_shapes(hf_config) -> Dict[str, tuple]:
    """Every weight a checkpoint of this architecture holds, by Hugging Face name (tied aliases
    left out), with its shape; computed without allocating the model."""
    model = model_from_config(hf_config, "meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in TIED_ALIASES}


def with_weights(hf_config, state, dtype=None):
    """A model of `hf_config` whose parameters are the tensors of `state` (a mapping by Hugging Face
    name), not copies, so the weights exist once in memory. With `dtype`, each tensor is first
    rounded to it and computed in float32, as a float32 reload of a `dtype` export would be."""
    import torch

    model = model_from_config(hf_config, "meta")
    made = {}
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        source = "shared.weight" if name in TIED_ALIASES else name
        if source not in made:
            tensor = state[source].detach()
            if dtype is not None:
                tensor = tensor.to(dtype).float()
            made[source] = torch.nn.Parameter(tensor, requires_grad=False)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, made[source])
    return model.eval()
