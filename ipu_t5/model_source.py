"""What a backend builds its model from: the architecture, where each weight comes from, dropout and
LoRA, without the weights themselves.

The trainer describes the model (`ModelSource`); each backend materialises what it holds. The
single-process and IPU backends build the whole model (`build`); the torch.distributed backend cuts
the meta-device model into its own stage's chunks and materialises only those (`materialise`), so
no rank ever holds, reads or initialises another stage's weights. A weight is read by name from a
lazy mapping (a Hugging Face directory's safetensors, or a resumed checkpoint), tensor by tensor, or
drawn by `ipu_t5.initialise` from its own generator: every layout starts from the same values.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from . import lora, prompt_tuning
from .errors import UserError
from .initialise import hf_name, initial_tensor
from .models import TIED_ALIASES, canonical_size, model_from_config, refuse_training_checkpoint, set_dropout
from .quantization import quantised_weight

# What a run needs from a hub repository: configuration, safetensors weights, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model"]


@dataclass
class ModelSource:
    """A Flan-T5 to build: `hf_config` (the run's dropout and vocabulary already in it), `weights`
    (a mapping by Hugging Face name, read when looked up; None draws every weight by
    `ipu_t5.initialise` under `seed`), `peft` (the run's peft section when LoRA adapters are
    injected, whose matrices are always drawn by name, or its soft prompt; `prompt_ids`: the token ids
    whose word embeddings a text-initialised soft prompt starts from, else it is drawn by name) or
    `module`, a model the caller built (`T5Trainer(config, pretrained=model)`), which backends take as
    it is."""

    hf_config: Any
    weights: Optional[Mapping[str, torch.Tensor]] = None
    seed: int = 0
    peft: Any = None
    module: Optional[torch.nn.Module] = None
    prompt_ids: Optional[List[int]] = None
    # int8 | nf4: the base quantised by bitsandbytes under LoRA (`ipu_t5.quantization`); none: float.
    quantization: str = "none"

    @classmethod
    def of(cls, model: Any) -> "ModelSource":
        """`model` itself when it is a ModelSource, else a source that hands out the module."""
        return model if isinstance(model, ModelSource) else cls(hf_config=model.config, module=model)

    def meta_model(self, quantised: bool = False) -> torch.nn.Module:
        """The model on the meta device (no memory), LoRA adapters injected: names, shapes, which
        parameters train, and the frame that `materialise` fills. `quantised`: a quantised base's
        Linear layers are bitsandbytes' (`quantization.quantised_frame`), which `materialise`
        quantises as it fills them (a pipeline stage's frame; otherwise the float model's, whose
        counts a trainer reports). A caller's module is itself."""
        if self.module is not None:
            return self.module
        model = model_from_config(self.hf_config, "meta")
        if quantised and self.quantization != "none":
            from .quantization import quantised_frame

            model = quantised_frame(model, self.quantization)
        return adapted(model, self.peft)

    def tensor(self, name: str, shape) -> torch.Tensor:
        """The starting value of parameter `name` (a LoRA model's name or a plain HF one), read or
        drawn on the CPU."""
        plain = hf_name(name)
        if plain == prompt_tuning.PROMPT_KEY and self.prompt_ids is not None:
            shared = self.tensor("shared.weight", (self.hf_config.vocab_size, self.hf_config.d_model))
            return shared[torch.tensor(self.prompt_ids)].clone()
        if self.weights is not None and not lora.is_adapter_key(plain):
            return self.weights[plain]
        return initial_tensor(name, shape, self.hf_config, self.seed)

    def materialise(self, module: torch.nn.Module, device: Any = "cpu") -> torch.nn.Module:
        """Give `module` (a meta-device model or a part of one whose parameter names are Hugging Face
        names) real parameters on `device`, filled by name one tensor at a time; a parameter shared
        by several modules (the tied embeddings) stays shared. A caller's module is moved instead."""
        if self.module is not None:
            return module.to(device)
        made: Dict[int, torch.nn.Parameter] = {}
        with torch.no_grad():
            for name, param in list(module.named_parameters(remove_duplicate=False)):
                if id(param) not in made:
                    value = self.tensor(name, tuple(param.shape)).to(dtype=torch.float32)
                    # A bitsandbytes layer's weight (a quantised frame's) is quantised as it is read.
                    quantised = quantised_weight(param, value, device) if self.quantization != "none" else None
                    made[id(param)] = quantised if quantised is not None else torch.nn.Parameter(
                        value.to(device).contiguous(), requires_grad=param.requires_grad)
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner) if owner else module, leaf, made[id(param)])
        return module

    def build(self, device: Any = "cpu") -> torch.nn.Module:
        """The whole model on `device`."""
        if self.quantization != "none" and self.module is None:
            from .quantization import load_quantised

            # The float base as any run builds it (no reference kept: it is freed once written), then
            # quantised, then LoRA's adapters drawn by name.
            model = load_quantised(self.materialise(model_from_config(self.hf_config, "meta"), "cpu"),
                                   self.quantization, device)
            model = adapted(model, self.peft)
            _draw_adapters(model, self.seed)
            return model
        return self.materialise(self.meta_model(), device)


def adapted(model: torch.nn.Module, peft_cfg) -> torch.nn.Module:
    """`model` with the run's peft adapters (None: as it is): LoRA injected in place, or wrapped
    with a soft prompt."""
    if peft_cfg is None or peft_cfg.method == "none":
        return model
    if peft_cfg.method == "prompt_tuning":
        return prompt_tuning.apply_prompt_tuning(model, peft_cfg)
    lora.apply_lora(model, peft_cfg)
    return model


def whole_model(model: Any, device: Any = "cpu") -> torch.nn.Module:
    """What a whole-model backend's `setup` takes: a ModelSource, built on `device`, or a module."""
    if isinstance(model, ModelSource):
        return model.build(device)
    return model


def _refuse_mismatch(source: str, hf_config, stored: Dict[str, tuple]) -> None:
    from .models import parameter_shapes

    if "lm_head.weight" not in stored:
        raise UserError("'{}' ties its LM head to the embedding (the original T5, not Flan-T5): ipu-t5 fine-tunes "
                        "Flan-T5, whose head is its own matrix.".format(source))
    expected = parameter_shapes(hf_config)
    missing = [k for k in expected if k not in stored]
    wrong = [k for k in expected if k in stored and tuple(stored[k]) != tuple(expected[k])]
    if missing or wrong:
        what = "lacks {} of the model's weights (first: {})".format(len(missing), missing[0]) if missing else \
            "holds {} of shape {} where its config.json says {}".format(wrong[0], stored[wrong[0]], expected[wrong[0]])
        raise UserError("the weights in '{}' do not fit its config.json: it {}.".format(source, what))


def hub_snapshot(source: str, backend=None) -> Path:
    """The local directory of hub repository `source`: downloaded by one process per node (local
    rank 0) while the node's others wait, then found in the cache by all; with HF_HUB_OFFLINE=1 only
    the cache is used."""
    def snapshot(local_only: bool) -> str:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source, allow_patterns=HUB_PATTERNS, local_files_only=local_only)
        except Exception as err:  # the hub client's errors are many types (HTTP, offline, not found)
            raise UserError("could not load weights '{}': {}. Without network access, download them first and set "
                            "model.pretrained to the directory.".format(source, str(err).splitlines()[0])) from None

    downloads = int(os.environ.get("LOCAL_RANK", "0")) == 0
    path, error = None, None
    if downloads:
        try:
            path = snapshot(False)
        except UserError as err:
            error = err
    # Also the barrier: the node's other processes read the cache only once it is complete.
    errors = backend.gather_object(error) if backend is not None else [error]
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed
    return Path(path if downloads else snapshot(True))


def pretrained_source(source: str, vocab_size: int, backend=None, **fields: Any) -> ModelSource:
    """A ModelSource whose weights are read lazily from a Hugging Face checkpoint: a local directory
    (`save_pretrained`'s one safetensors file or shards with their index; an ipu-t5 export) or a hub
    id. Refused in one line: a training checkpoint, a path without config.json or safetensors, the
    original T5's tied head, weights that do not fit their config, a vocabulary smaller than the
    tokenizer's."""
    from transformers import T5Config

    from .checkpointing.views import SafetensorsView, weight_files

    refuse_training_checkpoint(source)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError("'{}' is a path but holds no config.json: give a Hugging Face checkpoint "
                        "directory (an ipu-t5 export works) or a hub id.".format(source))
    directory = local if local.exists() else hub_snapshot(source, backend)
    files = weight_files(directory)
    if not files:
        raise UserError("'{}' holds no safetensors weights (model.safetensors, or shards with "
                        "model.safetensors.index.json), which ipu-t5 reads tensor by tensor: convert it with "
                        "T5ForConditionalGeneration.from_pretrained(DIR).save_pretrained(NEW_DIR).".format(source))
    # Its own tie_word_embeddings stays: the models built from it are untied by
    # `models.model_from_config` (where the embeddings also stay shared by the encoder and decoder).
    hf_config = T5Config.from_pretrained(str(directory))
    # Older checkpoints store the embedding under its tied aliases only; newer ones under shared.weight.
    aliases = dict({alias: "shared.weight" for alias in TIED_ALIASES}, **{"shared.weight": TIED_ALIASES[0]})
    weights = SafetensorsView(files, aliases)
    _refuse_mismatch(source, hf_config, weights.shapes())
    if hf_config.vocab_size < vocab_size:
        raise UserError("the tokenizer has {} tokens but '{}' embeds only {}: use the tokenizer that belongs to the "
                        "weights (model.tokenizer).".format(vocab_size, source, hf_config.vocab_size))
    return ModelSource(hf_config=hf_config, weights=weights, **fields)


def _draw_adapters(model: torch.nn.Module, seed: int, prompt_ids: Optional[List[int]] = None) -> None:
    """Give the adapters of a caller's model the values every other source gives them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == prompt_tuning.PROMPT_KEY and prompt_ids is not None:
                param.copy_(model.shared.weight[torch.tensor(prompt_ids, device=param.device)])
            elif lora.is_adapter_key(name):
                param.copy_(initial_tensor(name, tuple(param.shape), model.config, seed))


def run_source(config, vocab_size: int, backend=None, pretrained: Any = None,
               weights: Optional[Mapping[str, torch.Tensor]] = None, tokenizer=None) -> ModelSource:
    """The ModelSource of a run: `pretrained` (a module, a hub id or directory, or a T5Config whose
    weights are `weights`, a resumed checkpoint's), else the config's `model.pretrained`, its size's
    hub weights, or (tiny) weights drawn by name under `training.seed`; the run's dropout, and its
    LoRA adapters when `peft.method` is lora, its soft prompt when prompt_tuning (`tokenizer`: the
    run's, which tokenizes `peft.prompt_tuning_init_text`)."""
    from transformers import PretrainedConfig, T5Config

    fields: Dict[str, Any] = {"seed": config.training.seed, "peft": config.peft if lora.enabled(config) else None,
                              "quantization": config.model.quantization}
    peft = config.peft
    if prompt_tuning.enabled(config) and peft.prompt_tuning_init == "text" and tokenizer is not None:
        fields["prompt_ids"] = prompt_tuning.init_ids(tokenizer(peft.prompt_tuning_init_text)["input_ids"],
                                                      prompt_tuning.SEQ2SEQ_SUBMODULES * peft.num_virtual_tokens)
    if isinstance(pretrained, torch.nn.Module):
        if lora.enabled(config):
            pretrained = adapted(pretrained, config.peft)
            _draw_adapters(pretrained, config.training.seed, fields.get("prompt_ids"))
        source = ModelSource(hf_config=pretrained.config, module=pretrained, seed=config.training.seed,
                             quantization=config.model.quantization)
    elif isinstance(pretrained, PretrainedConfig):
        source = ModelSource(hf_config=pretrained, weights=weights, **fields)
    else:
        size = canonical_size(config.model.name)
        name = str(pretrained) if pretrained is not None else (config.model.pretrained or size.hub_id)
        if name is None:
            kwargs = size.t5_config_kwargs()
            kwargs["vocab_size"] = vocab_size
            source = ModelSource(hf_config=T5Config(**kwargs), **fields)
        else:
            source = pretrained_source(name, vocab_size, backend, **fields)
    if config.model.dropout_rate is not None:
        if source.module is not None:
            set_dropout(source.module, config.model.dropout_rate)
        else:
            source.hf_config.dropout_rate = config.model.dropout_rate
    return source


def build_model(config, vocab_size: int) -> torch.nn.Module:
    """The whole model a run of `config` starts from, on the CPU, without LoRA adapters (the base
    they adapt)."""
    source = run_source(config, vocab_size)
    source.peft, source.quantization = None, "none"
    return source.build()
