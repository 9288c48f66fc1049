"""Hugging Face export: a directory that plain `transformers` 4.x and 5.x load as the same model.

Writes config.json (untied head spelled so 4.x reads it right), safetensors weights (sharded with an
index file above `max_shard_size`, as `save_pretrained` does), tokenizer files,
generation_config.json and a model card into a staging directory beside the target. Before that
directory is renamed into place, plain transformers reloads it and its logits on a fixed batch are
compared with the trainer's: an export that would load "fine" and compute something else (a tied
head, a missing weight) is never put in place.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import yaml

from ..compat import dtype_kwarg, export_config_dict
from ..errors import UserError
from ..models import TIED_ALIASES, with_weights
from ..tokenizer import save_with_prompt_length
from . import atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Largest difference allowed between the reloaded export's float32 logits and the trainer's.
TOLERANCE = 1e-5


def export_tensors(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The tensors an HF T5 checkpoint holds: no tied aliases, contiguous, in `dtype`."""
    return {k: state[k].detach().to("cpu", dtype).contiguous() for k in state if k not in TIED_ALIASES}


def _shapes(state: Mapping[str, torch.Tensor]) -> Dict[str, tuple]:
    """Shapes by name, without reading tensors a lazy view has not loaded."""
    if hasattr(state, "shapes"):
        return {k: v for k, v in state.shapes().items() if k not in TIED_ALIASES}
    return {k: tuple(v.shape) for k, v in state.items() if k not in TIED_ALIASES}


def plan_shards(shapes: Dict[str, tuple], dtype: torch.dtype, max_shard_size: str):
    """huggingface_hub's split of the weights into files of at most `max_shard_size` (a single
    `model.safetensors` when they fit)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in shapes.items()}
    try:
        return split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size)
    except ValueError as err:
        raise UserError("--max-shard-size {!r} is not a size ({}): write it like 5GB or 500MB.".format(
            max_shard_size, err)) from None


def parity_batch(hf_config) -> Dict[str, torch.Tensor]:
    """A fixed batch: 4 prompts of different lengths (so padding is exercised) with token ids drawn
    from the ordinary vocabulary with a fixed seed, and 8 decoder positions."""
    generator = torch.Generator().manual_seed(0)
    low, high = 3, hf_config.vocab_size
    input_ids = torch.randint(low, high, (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate((24, 17, 9, 3)):
        input_ids[row, length - 1] = hf_config.eos_token_id
        input_ids[row, length:] = hf_config.pad_token_id
        attention_mask[row, length:] = 0
    decoder_input_ids = torch.randint(low, high, (4, 8), generator=generator)
    decoder_input_ids[:, 0] = hf_config.decoder_start_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def logits_on(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits of a T5 on a `parity_batch`."""
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


@dataclass
class ExportResult:
    """Where an export went and how closely its reload matched the trainer's model."""

    path: Path
    files: List[str]
    dtype: torch.dtype
    max_difference: float

    def describe(self) -> str:
        """The line printed after an export."""
        import transformers

        return ("exported {} ({} weight file(s), {}); reloaded with transformers {}: its logits on a fixed "
                "batch match the trainer's (max |difference| {:.1e}, tolerance {:.0e})".format(
                    self.path, len(self.files), str(self.dtype).replace("torch.", ""),
                    transformers.__version__, self.max_difference, TOLERANCE))


def model_card(config: Dict[str, Any], results: Optional[Dict[str, Any]], base_model: str,
               example_prompt: Optional[str] = None, prompt_length: Optional[int] = None) -> str:
    """README.md for the export: what it is, how it was trained, what it scored, how to load it."""
    prompt = repr(example_prompt or "mnli hypothesis: ... premise: ...")
    lines = ["---", "library_name: transformers", "pipeline_tag: text2text-generation",
             "tags: [t5, flan-t5, ipu-t5, {}]".format(config["data"]["task"])]
    if base_model:
        lines.append("base_model: {}".format(base_model))
    lines += ["---", "", "# Flan-T5 fine-tuned with ipu-t5", "",
              "Task: **{}**, data source: {}.".format(config["data"]["task"], config["data"]["source"]), ""]
    peft = config.get("peft") or {}
    if peft.get("method") == "lora":
        lines += ["Fine-tuned with LoRA (r={}, alpha={}, on {}); the adapters are merged into these weights, "
                  "so this is a plain T5 checkpoint. The run exports the adapter alone as well (`<output-dir>/adapter/`), "
                  "for `peft.PeftModel.from_pretrained`.".format(
                      peft["r"], peft["lora_alpha"], ", ".join(peft["target_modules"])), ""]
    if prompt_length:
        lines += ["Prompts were truncated to at most {0} tokens (the end-of-sequence token included) in "
                  "training and validation. The tokenizer's `model_max_length` is {0}, so "
                  "`tokenizer(..., truncation=True)` (transformers 5.x) and `pipeline(..., truncation=True)` "
                  "(4.x) cut prompts the same way and "
                  "reproduce the validation results below; without `truncation=True` longer prompts are read "
                  "whole.".format(prompt_length), ""]
    if results:
        shown = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        lines += ["## Validation (generation-based)", "", "| metric | value |", "|---|---|"]
        lines += ["| {} | {} |".format(k, round(v, 4) if isinstance(v, float) else v) for k, v in shown.items()]
        lines.append("")
    lines += ["## Loading", "", "transformers 5.x:", "", "```python",
              "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForSeq2SeqLM.from_pretrained(PATH)",
              "ids = tok([{}], return_tensors='pt', truncation=True)".format(prompt),
              "print(tok.batch_decode(model.generate(**ids), skip_special_tokens=True))", "```", "",
              "transformers 4.x:", "", "```python", "from transformers import pipeline",
              "print(pipeline('text2text-generation', model=PATH)({}, truncation=True))".format(prompt),
              "```", "", "## Training configuration", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_hf_checkpoint(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    hf_config,
    tokenizer,
    run_config: Dict[str, Any],
    results: Optional[Dict[str, Any]] = None,
    max_new_tokens: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    example_prompt: Optional[str] = None,
    prompt_length: Optional[int] = None,
) -> ExportResult:
    """Write the export of the weights `state` (by Hugging Face name; a lazy mapping is read one
    shard at a time) atomically, once transformers has reloaded it as the same model.

    `prompt_length`: the token count the run truncated prompts to; the saved tokenizer's
    `model_max_length`, and named in the model card.

    An existing export at `out_dir` is replaced only by a complete, checked one. The check never
    holds two copies of the weights: the reference logits are computed on `state`'s own tensors
    (float32 exports) and released before the reload.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    shapes = _shapes(state)
    split = plan_shards(shapes, dtype, max_shard_size)
    batch = parity_batch(hf_config)
    # Rounded to the export's dtype first, so the comparison measures the export, not the rounding.
    reference = logits_on(with_weights(hf_config, state, None if dtype == torch.float32 else dtype), batch)
    needed = split.metadata["total_size"]
    try:
        with atomic.staged_dir(out_dir) as staging:
            with open(str(staging / "config.json"), "w") as f:
                json.dump(export_config_dict(hf_config, dtype), f, indent=2, sort_keys=True)
            for filename, names in split.filename_to_tensors.items():
                save_file(export_tensors({n: state[n] for n in names}, dtype), str(staging / filename),
                          metadata={"format": "pt"})
            if split.is_sharded:
                with open(str(staging / "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f,
                              indent=2, sort_keys=True)
            save_with_prompt_length(tokenizer, str(staging), prompt_length)
            generation = GenerationConfig(
                decoder_start_token_id=hf_config.decoder_start_token_id, eos_token_id=hf_config.eos_token_id,
                pad_token_id=hf_config.pad_token_id,
                # Validation capped new tokens at the longest target; the export does the same, so plain
                # transformers predicts exactly what validation measured.
                **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
            generation.save_pretrained(str(staging))
            base = run_config["model"].get("pretrained") or ""
            (staging / "README.md").write_text(model_card(run_config, results, base, example_prompt,
                                                                  prompt_length))
            difference = _check_reload(staging, batch, reference)
    except Exception as err:
        if not isinstance(err, UserError) and atomic.is_no_space(err):
            raise _no_space(out_dir, needed) from None
        raise
    return ExportResult(out_dir, sorted(split.filename_to_tensors), dtype, difference)


def _no_space(out_dir: Path, needed: int) -> UserError:
    return UserError("no space left on the device while exporting to {}: the weights need about {} ({} bytes) "
                     "and {} are free there. Free space or choose another --out; any earlier export there is "
                     "intact.".format(out_dir, atomic.human_bytes(needed), needed,
                                      atomic.human_bytes(atomic.free_bytes(out_dir.parent))))


def _check_reload(directory: Path, batch: Dict[str, torch.Tensor], reference: torch.Tensor) -> float:
    """Reload `directory` with plain transformers in float32; its logits on `batch` must match."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), **dtype_kwarg(torch.float32)).eval()
    difference = float((logits_on(model, batch) - reference).abs().max())
    if not difference <= TOLERANCE:
        raise UserError("the export does not reload as the trained model: transformers' logits on a fixed batch "
                        "differ from the trainer's by up to {:.3g} (tolerance {:.0e}), so nothing was written. "
                        "Please report this with your transformers version.".format(difference, TOLERANCE))
    return difference


def reload_and_predict(hf_dir: Path, prompts: List[str], batch_size: int = 64) -> List[str]:
    """Load an export with plain transformers (5.x: AutoModelForSeq2SeqLM + generate) and predict,
    as a user without ipu-t5 would."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)).eval()
    texts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            # Truncated at the tokenizer's model_max_length: the run's prompt length.
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True)
            texts += tokenizer.batch_decode(model.generate(**batch, do_sample=False, num_beams=1),
                                            skip_special_tokens=True)
    return texts
