"""The Flan-T5 size registry, per-block cost arithmetic, and model construction.

The registry holds each size's dimensions, so a layout or memory plan for XXL needs no weights.
"""
from dataclasses import dataclass, replace
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


# ModelSize's fields as T5Config names them, with T5Config's defaults for keys a config.json may omit.
_CONFIG_DEFAULTS = {"d_model": 512, "d_ff": 2048, "num_heads": 8, "d_kv": 64, "num_layers": 6,
                    "num_decoder_layers": None, "vocab_size": 32128, "relative_attention_num_buckets": 32}


def size_from_hf_config(hf_config, source: str = "the weights' config.json") -> ModelSize:
    """The ModelSize of a T5 config (a `T5Config`, or a config.json's mapping): the registry's entry
    when every dimension matches one, else a size named `custom` with the config's dimensions."""
    read = hf_config.get if isinstance(hf_config, dict) else lambda key, default=None: getattr(hf_config, key, default)
    model_type = read("model_type", "t5")
    if model_type != "t5":
        raise UserError("{} names a '{}' model, not a T5: ipu-t5 fine-tunes Flan-T5 checkpoints.".format(
            source, model_type))
    dims = {key: read(key, default) for key, default in _CONFIG_DEFAULTS.items()}
    dims["num_decoder_layers"] = dims["num_decoder_layers"] or dims["num_layers"]
    for size in SIZES.values():
        if all(getattr(size, key) == value for key, value in dims.items() if key != "vocab_size"):
            # A drawn model's vocabulary is its tokenizer's (the tiny demo's is below the entry's).
            return size if size.vocab_size == dims["vocab_size"] else replace(size, vocab_size=dims["vocab_size"])
    return ModelSize("custom", None, "custom", **dims)


def _read_config_json(pretrained: str) -> Optional[dict]:
    """The config.json beside weights `pretrained` (a directory, or a hub id from the cache or the
    hub); None where there is none to read (the weights' loader refuses such a source itself)."""
    import json

    local = Path(pretrained).expanduser()
    path = local / "config.json"
    if not local.exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(pretrained, "config.json"))
        except Exception:  # offline without a cached copy, or no such repository: the loader says so
            return None
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError("cannot read {}: {}. Give a Hugging Face checkpoint directory whose config.json is "
                        "valid JSON.".format(path, err)) from None


def model_size(config, pretrained=None) -> ModelSize:
    """The architecture a run builds: the weights' own config.json when the run starts from weights
    (`pretrained`: a model, a T5Config, a directory or hub id; else `model.pretrained`), since the file
    is the truth; the registry's entry of `model.name` when the weights are drawn."""
    registered = canonical_size(config.model.name)
    pretrained = config.model.pretrained if pretrained is None else pretrained
    if pretrained is None:
        return registered
    if hasattr(pretrained, "config") or hasattr(pretrained, "d_model"):
        return size_from_hf_config(getattr(pretrained, "config", pretrained))
    data = _read_config_json(str(pretrained))
    if data is None:
        # A registry hub id not cached offline: its registry entry describes it.
        return next((s for s in SIZES.values() if s.hub_id == str(pretrained)), registered)
    return size_from_hf_config(data, "the config.json of '{}'".format(pretrained))


def size_note(config, size: ModelSize) -> Optional[str]:
    """One line where the weights' architecture is not the registry entry `model.name` names."""
    if size.name == canonical_size(config.model.name).name:
        return None
    what = "Flan-T5 {}".format(size.name) if size.name != "custom" else \
        "T5 of a shape in no registry entry (d_model {}, d_ff {}, {} heads, {}+{} blocks)".format(
            size.d_model, size.d_ff, size.num_heads, size.num_layers, size.num_decoder_layers)
    return ("model.name is '{}' but the weights are a {}: every backend builds and plans what the weights' "
            "config.json describes.".format(config.model.name, what))


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
