"""Load an ipu-t5 export with plain transformers, as a user without ipu-t5 would, on whatever
stack runs this script: transformers 4.x through `pipeline("text2text-generation")` (the call in
Graphcore's notebook), 5.x through AutoModelForSeq2SeqLM + generate (5.x removed that pipeline).

    python reload_export.py EXPORT_DIR REQUEST.json RESULT.json

REQUEST holds `input_ids`, `decoder_input_ids` (for logits) and `prompts` (for predictions). Prompts are
truncated as the model card says (`truncation=True`: at the tokenizer's model_max_length, the run's
prompt length).
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def main(export_dir, request_path, result_path):
    request = json.load(open(request_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(request["input_ids"]),
                       decoder_input_ids=torch.tensor(request["decoder_input_ids"])).logits
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        generator = transformers.pipeline("text2text-generation", model=export_dir)
        predictions = [out["generated_text"] for out in generator(request["prompts"], truncation=True)]
    else:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
        batch = tokenizer(request["prompts"], return_tensors="pt", padding=True, truncation=True)
        predictions = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    json.dump({"transformers": transformers.__version__, "logits": logits.tolist(), "predictions": predictions,
               "project_imported": any(m.split(".")[0] == "ipu_t5" for m in sys.modules)},
              open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
