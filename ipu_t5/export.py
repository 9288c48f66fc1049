"""Hugging Face export: a directory that plain `transformers` 4.x and 5.x load as the same model.

Writes config.json (untied head spelled so 4.x reads it right), model.safetensors, tokenizer
files, generation_config.json and a model card, into a temporary directory beside the target that
is renamed into place, so an interrupted export never leaves a half-written checkpoint.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import yaml

from .compat import export_config_dict

# Tied to `shared.weight`; HF checkpoints store only the shared copy.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def export_tensors(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The tensors an HF T5 checkpoint holds: no tied aliases, contiguous, in `dtype`."""
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()
            if k not in TIED_ALIASES}


def model_card(config: Dict[str, Any], results: Optional[Dict[str, Any]], base_model: str,
               example_prompt: Optional[str] = None) -> str:
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
    if results:
        shown = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        lines += ["## Validation (generation-based)", "", "| metric | value |", "|---|---|"]
        lines += ["| {} | {} |".format(k, round(v, 4) if isinstance(v, float) else v) for k, v in shown.items()]
        lines.append("")
    lines += ["## Loading", "", "transformers 5.x:", "", "```python",
              "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForSeq2SeqLM.from_pretrained(PATH)",
              "ids = tok([{}], return_tensors='pt')".format(prompt),
              "print(tok.batch_decode(model.generate(**ids), skip_special_tokens=True))", "```", "",
              "transformers 4.x:", "", "```python", "from transformers import pipeline",
              "print(pipeline('text2text-generation', model=PATH)({}))".format(prompt),
              "```", "", "## Training configuration", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_hf_checkpoint(
    out_dir: Path,
    state: Dict[str, torch.Tensor],
    hf_config,
    tokenizer,
    run_config: Dict[str, Any],
    results: Optional[Dict[str, Any]] = None,
    max_new_tokens: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    example_prompt: Optional[str] = None,
) -> Path:
    """Write the export atomically; an existing export at `out_dir` is replaced only once the new
    one is complete."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    with staged_dir(out_dir) as staging:
        with open(staging / "config.json", "w") as f:
            json.dump(export_config_dict(hf_config, dtype), f, indent=2, sort_keys=True)
        save_file(export_tensors(state, dtype), str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(staging))
        generation = GenerationConfig(
            decoder_start_token_id=hf_config.decoder_start_token_id, eos_token_id=hf_config.eos_token_id,
            pad_token_id=hf_config.pad_token_id,
            # Validation capped new tokens at the longest target; the export does the same, so plain
            # transformers predicts exactly what validation measured.
            **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
        generation.save_pretrained(str(staging))
        base = run_config["model"].get("pretrained") or ""
        (staging / "README.md").write_text(model_card(run_config, results, base, example_prompt))
    return Path(out_dir)


@contextlib.contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write into; it replaces `out_dir` only when the
    block finishes without an error, so an interrupted write never leaves a half-written export."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".{}.".format(out_dir.name), dir=str(out_dir.parent)))
    try:
        yield staging
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(str(staging), ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; the old target survives until the rename succeeded."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".{}.old.".format(target.name), dir=str(target.parent)))
        os.rename(str(target), str(old / "previous"))
    try:
        os.rename(str(new), str(target))
    except OSError:
        if old is not None:
            os.rename(str(old / "previous"), str(target))
        raise
    finally:
        if old is not None:
            shutil.rmtree(str(old), ignore_errors=True)


def reload_and_predict(hf_dir: Path, prompts: List[str], batch_size: int = 64) -> List[str]:
    """Load an export with plain transformers (5.x: AutoModelForSeq2SeqLM + generate) and predict,
    as a user without ipu-t5 would."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)).eval()
    texts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            texts += tokenizer.batch_decode(model.generate(**batch, do_sample=False, num_beams=1),
                                            skip_special_tokens=True)
    return texts
