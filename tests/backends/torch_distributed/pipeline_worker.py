"""Runs under torchrun for tests/backends/torch_distributed/test_pipeline.py: trains, validates and checkpoints a tiny T5 under one
layout with the torch.distributed backend, and writes what it saw (rank 0) for the test to compare
with one process.

    python -m tests.backends.torch_distributed.pipeline_worker OUT STAGES REPLICAS RUN [RUN ...] [--resume-from CKPT] [--lora]

A RUN is SCHEDULE or SCHEDULE:DATA_PARALLEL (e.g. 1F1B:fsdp, FSDP2 a unit per block; 1F1B:fsdp-stage, a unit per chunk). Each run trains STEPS steps into
OUT/<run>, then writes OUT/<run>/result.pt (losses, weights, optimizer state names, predictions,
accuracy); the first run also writes a checkpoint at OUT/<run>/checkpoint and its export at OUT/<run>/hf.
With --resume-from, a
last run resumes that (one-process) checkpoint under the layout (run as --resume-run), as
`--resume PATH` does, and continues to RESUMED_STEPS, writing OUT/resumed/result.pt. With --lora
every run trains LoRA adapters (`LORA`) and also exports itself (OUT/<run>/hf, merged, and
OUT/<run>/adapter); with --prompt-tuning a soft prompt (`PROMPT_TUNING`), exported likewise; with
--quantization KIND the LoRA adapters train on a base quantised to KIND, and --extra adds overrides.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.conftest import losses

STEPS = 5
RESUMED_STEPS = 8


# LoRA as the comparisons need it: dropout off (as configs/tiny.yaml has it for the model), so every
# layout computes the same function; a small rank keeps the run quick.
LORA = ["peft.method=lora", "peft.r=4", "peft.lora_alpha=8", "peft.lora_dropout=0"]
# A soft prompt of 4 virtual tokens, started from text (the word embeddings of its ids).
PROMPT_TUNING = ["peft.method=prompt_tuning", "peft.num_virtual_tokens=4", "peft.prompt_tuning_init=text",
                 "peft.prompt_tuning_init_text=premise and hypothesis"]


def make_config(output_dir, stages=1, replicas=1, schedule="1F1B", data_parallel="ddp", backend="torch",
                max_steps=STEPS, lora=False, extra=()):
    """The tiny run every layout is compared on. Dropout is 0 (configs/tiny.yaml). The learning rate
    is 1e-4: Adam turns fp32 rounding in near-zero gradients into updates of a fraction of the
    learning rate, so even one process with another micro-batch split ends up 3e-5 apart after 5
    steps at 1e-3, but 3e-6 apart at 1e-4, well inside the 1e-5 the comparison asks for. `lora`
    trains LoRA adapters instead of every weight; `extra` adds overrides. `data_parallel`
    "fsdp-stage" is FSDP2 with each chunk one unit, kept whole through the step."""
    from ipu_t5.config import load_config

    if data_parallel == "fsdp-stage":
        data_parallel, extra = "fsdp", list(extra) + ["layout.fsdp_reshard_after_forward=false"]

    return load_config("tiny", overrides=[
        "output.output_dir={}".format(output_dir), "output.report_to_tensorboard=false",
        "data.demo_train_samples=64", "data.demo_eval_samples=21", "validation.per_device_eval_batch_size=8",
        "training.global_batch_size=8", "training.learning_rate=1e-4", "training.logging_steps=1",
        "training.max_steps={}".format(max_steps), "layout.stages={}".format(stages),
        "layout.replicas={}".format(replicas), "layout.pipeline_schedule={}".format(schedule),
        "layout.data_parallel={}".format(data_parallel), "layout.backend={}".format(backend),
        # Ranks that disagree about a collective fail within this, well inside the test's timeout.
        "layout.ddp_timeout=300"] + (LORA if lora else []) + list(extra))


def _fsdp_units(backend) -> list:
    """The names, within their chunk, of the modules FSDP2 made units of on this rank."""
    from torch.distributed.fsdp import FSDPModule

    return sorted(name for chunk in getattr(backend, "chunks", {}).values()
                  for name, module in chunk.named_modules() if isinstance(module, FSDPModule))


def _base_bytes(backend) -> dict:
    """`quantization.weight_bytes` of the modules this rank holds (a stage's chunks, or the model)."""
    from ipu_t5.quantization import weight_bytes

    held = [weight_bytes(m) for m in (list(getattr(backend, "chunks", {}).values()) or [backend.model])]
    return {key: sum(h[key] for h in held) for key in ("held", "float32")}


def result(trainer, evaluated=None) -> dict:
    """What the test compares: losses, weights by name, and (when validated) predictions, and with a
    quantised base each rank's `_base_bytes`; on the main process only (the others take part in
    gathering the weights)."""
    # A copy: a backend may hand out its live parameters, which later steps change.
    weights = {k: v.clone() for k, v in trainer.backend.model_state_dict().items()}
    optimized = sorted(trainer.backend.optimizer_state_dict())
    base_bytes = trainer.backend.gather_object(_base_bytes(trainer.backend)) \
        if trainer.config.model.quantization != "none" else None
    if not trainer.is_main_process:
        return {}
    out = {"losses": list(losses(trainer.output_dir).values()), "weights": weights, "optimized": optimized,
           "fsdp_units": _fsdp_units(trainer.backend), "base_bytes": base_bytes}
    if evaluated is not None:
        out["accuracy"] = evaluated["accuracy"]
        out["predictions"] = [json.loads(line)["generated"]
                              for line in open(trainer.output_dir / "eval_predictions.jsonl")]
    return out


def main() -> None:
    from ipu_t5.training.trainer import T5Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("stages", type=int)
    parser.add_argument("replicas", type=int)
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--resume-from")
    parser.add_argument("--resume-run", default="1F1B", help="the RUN that continues the checkpoint")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters, and export each run")
    parser.add_argument("--prompt-tuning", action="store_true", help="train a soft prompt, and export each run")
    parser.add_argument("--quantization", default="none", help="with --lora: the base's model.quantization")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides (KEY=VALUE) for every run")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    out = Path(args.out)
    extra = (PROMPT_TUNING if args.prompt_tuning else []) + ["model.quantization=" + args.quantization] + args.extra
    for index, run in enumerate(args.runs):
        schedule, _, data_parallel = run.partition(":")
        config = make_config(out / run.replace(":", "-"), args.stages, args.replicas, schedule, data_parallel or "ddp",
                             lora=args.lora, extra=extra)
        trainer = T5Trainer(config)
        trainer.train()
        evaluated = trainer.evaluate()
        if args.lora or args.prompt_tuning or index == 0:
            trainer.export_hf()
        if index == 0:
            trainer.save_checkpoint(config.output_dir / "checkpoint")
        found = result(trainer, evaluated)
        if trainer.is_main_process:
            torch.save(found, str(config.output_dir / "result.pt"))
        trainer.close()
    if args.resume_from:
        schedule, _, data_parallel = args.resume_run.partition(":")
        config = make_config(out / "resumed", args.stages, args.replicas, schedule, data_parallel or "ddp",
                             max_steps=RESUMED_STEPS, lora=args.lora,
                             extra=extra + ["output.resume_from_checkpoint={}".format(args.resume_from)])
        trainer = T5Trainer(config)
        trainer.train()
        found = result(trainer)
        if trainer.is_main_process:
            torch.save(found, str(config.output_dir / "result.pt"))
        trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
