"""`ipu-t5 predict SOURCE --data-files test=PATH --out FILE.jsonl`: an export, a run or a training
checkpoint turned into predictions for new data, on any backend and layout the flags name.

The file is written as rows are generated and continued by the same command after an interruption
(`training/predict.py`); `--glue-submission DIR` also writes GLUE's MNLI submission file.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

from .errors import UserError
from .flags import config_from_args, offline_if_possible, writing


def add_predict_command(commands, add_config_flags, add_cluster_flags) -> None:
    predict = commands.add_parser("predict", help="predictions of an export, run or checkpoint for new data, "
                                                  "written as they come and resumable")
    predict.add_argument("source", help="a Hugging Face export (directory with config.json), a run's output "
                                        "directory (its hf/ export, else its newest checkpoint) or a training "
                                        "checkpoint (checkpoints/step-N)")
    predict.add_argument("--out", required=True, help="the predictions file (JSON lines); an existing one from an "
                                                      "interrupted run of the same command is continued")
    predict.add_argument("--split", help="the split to predict: a name of --data-files or a hub split (default: "
                                         "test, or the only split given)")
    predict.add_argument("--glue-submission", metavar="DIR", help="MNLI: also write GLUE's submission file into DIR "
                                                                 "(MNLI-m.tsv for a split named *matched, MNLI-mm.tsv "
                                                                 "for *mismatched)")
    add_config_flags(predict)
    add_cluster_flags(predict)
    predict.set_defaults(func=cmd_predict)


def _resolve_source(source: str, config) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(pretrained, weights, tokenizer) for SOURCE; an export or a run's export sets
    `model.pretrained` and returns Nones."""
    from . import checkpointing

    path = Path(source).expanduser()
    for export in (path, path / "hf"):
        if (export / "config.json").is_file():
            config.model.pretrained = str(export)
            return None, None, None
    if not path.is_dir():
        raise UserError("SOURCE '{}' is not a directory: give a Hugging Face export, a run's output directory or a "
                        "training checkpoint (checkpoints/step-N).".format(source))
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    found = checkpointing.resolve("auto" if checkpointing.list_steps(path) else str(path), path, say)
    if found is None:
        raise UserError("SOURCE '{}' holds no export (config.json, hf/) and no checkpoint: give a Hugging Face "
                        "export, a run's output directory or a checkpoint.".format(source))
    if found.run_config().get("peft", {}).get("method", "none") != "none":
        raise UserError("checkpoint {} holds LoRA adapters only: export it first (ipu-t5 export {} --out DIR) and "
                        "predict from DIR.".format(found.path, found.path))
    return found.hf_config(), found.model_tensors(), found.tokenizer()


def _pick_split(config, requested: Optional[str]) -> str:
    if requested:
        return requested
    if config.data.source == "files":
        names = list(config.data.data_files)
        if len(names) == 1:
            return names[0]
    return "test"


def cmd_predict(args: argparse.Namespace) -> int:
    from .backends.torch_distributed.launch import maybe_launch

    config = config_from_args(args)
    # The memory plan counts training; generation holds far less.
    config.layout.check_memory = False
    out = Path(args.out).expanduser()
    if args.output_dir is None:
        # Where a multi-process run keeps its ranks' logs: beside the predictions file.
        config.output.output_dir = out.parent / (out.name + ".run")
    pretrained, weights, tokenizer = _resolve_source(args.source, config)
    offline_if_possible(config)
    # One writer of a predictions file: the lock of the run directory it lies in, else of its own
    # `.run` directory beside it (where a multi-process predict keeps its ranks' logs).
    lock_dir = out.parent if (out.parent / "run_config.yaml").is_file() else Path(config.output.output_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with writing(lock_dir, args.argv):
        launched = maybe_launch(config, args.argv, args)
        if launched is not None:
            return launched
        return _run(config, args, out, pretrained, weights, tokenizer)


def _run(config, args, out: Path, pretrained, weights, tokenizer) -> int:
    from .data.sources import load_split
    from .tasks import build_task
    from .tokenizer import load_tokenizer
    from .training.predict import check_rows, predict_rows
    from .training.predict_backend import build_backend

    task = build_task(config)
    split = _pick_split(config, args.split)
    if args.glue_submission:
        from .tasks.mnli import glue_file_name

        glue_file_name(split, task)
    dataset, where = load_split(config, task, split)
    rows = check_rows(dataset, task, where)
    tokenizer = tokenizer or load_tokenizer(config)
    backend, prompt_length, max_new_tokens = build_backend(config, task, rows, tokenizer, pretrained, weights)
    try:
        result = predict_rows(backend, tokenizer, task, rows, config.validation.per_device_eval_batch_size,
                              max_new_tokens, prompt_length, task.postprocess, backend.is_main_process, out)
        if backend.is_main_process:
            if args.glue_submission:
                from .tasks.mnli import write_glue_submission

                indices = [row.get("idx", row.get("index", n)) for n, row in enumerate(rows)]
                written = write_glue_submission(Path(args.glue_submission), split, task, indices, result.predictions)
                print("GLUE submission: {}".format(written), file=sys.stderr)
            summary = {"predictions": str(out), "rows": len(rows), "split": split}
            if result.metrics is not None:
                summary.update({k: result.metrics[k] for k in result.metrics["metrics"]})
                summary["samples_per_second"] = result.metrics["samples_per_second"]
            print(json.dumps(summary, indent=2))
        return 0
    finally:
        backend.close()
