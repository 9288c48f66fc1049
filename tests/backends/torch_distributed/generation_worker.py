"""Runs under torchrun for tests/backends/torch_distributed/test_generation.py: one pipelined
`generate` call over given prompts, counting the decoding positions the last chunk computes.

    python -m tests.backends.torch_distributed.generation_worker OUT EXPORT PROMPTS.json MAX_NEW_TOKENS K BATCH [LAYERS]

LAYERS: layout.layers_per_stage (e.g. [3,1]); default the plan's cut.

Every rank writes OUT/rank<r>.json: the prompts' token ids, the generated ids (every rank has them
all), and how many encoder passes and decoding positions its chunk with the LM head computed.
"""
import json
import sys
from pathlib import Path


def main() -> None:
    import torch.distributed as dist

    from ipu_t5.config import load_config
    from ipu_t5.tasks import build_task
    from ipu_t5.tokenizer import load_tokenizer
    from ipu_t5.training.predict_backend import build_backend

    out, export, prompts_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    max_new_tokens, slots, batch = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    config = load_config("tiny", overrides=[
        "model.pretrained={}".format(export), "layout.backend=torch", "layout.stages=2",
        "validation.generation_micro_batches={}".format(slots),
        "validation.per_device_eval_batch_size={}".format(batch),
        "validation.max_new_tokens={}".format(max_new_tokens), "output.output_dir={}".format(out / "run"),
        "layout.ddp_timeout=300"] + ["layout.layers_per_stage={}".format(a) for a in sys.argv[7:8]])
    task = build_task(config)
    rows = json.loads(Path(prompts_file).read_text())
    tokenizer = load_tokenizer(config)
    backend, prompt_length, _ = build_backend(config, task, rows, tokenizer)
    ids = tokenizer([task.source_text(r) for r in rows], truncation=True, max_length=prompt_length)["input_ids"]
    counts = {"encodes": 0, "positions": 0}
    for chunk in backend.chunks.values():
        if chunk.has_head:
            encode, decode_step = chunk.encode, chunk.decode_step

            def counted_encode(*args, _f=encode, **kwargs):
                counts["encodes"] += 1
                return _f(*args, **kwargs)

            def counted_decode(*args, _f=decode_step, **kwargs):
                counts["positions"] += 1
                return _f(*args, **kwargs)

            chunk.encode, chunk.decode_step = counted_encode, counted_decode
    generated = backend.generate([{"input_ids": i, "labels": []} for i in ids], max_new_tokens)
    rank = dist.get_rank()
    (out / "rank{}.json".format(rank)).write_text(json.dumps(dict(counts, generated=generated, ids=ids,
                                                                  slots=backend.generation_slots)))
    backend.close()


if __name__ == "__main__":
    main()
