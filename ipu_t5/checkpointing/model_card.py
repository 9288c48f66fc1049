"""README.md of a Hugging Face export: what it is, how it was trained, what it scored, how to load
it with transformers 4.x and 5.x."""
from typing import Any, Dict, Optional

import yaml


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
