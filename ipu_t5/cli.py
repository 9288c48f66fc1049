"""`ipu-t5 train | evaluate | export`: flags become config overrides, and this is the one place
that turns a UserError into a single line and a non-zero exit."""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserError

# Dedicated flags and the config keys they set.
FLAG_KEYS = {
    "max_steps": "training.max_steps",
    "output_dir": "output.output_dir",
    "task": "data.task",
    "backend": "layout.backend",
    "stages": "layout.stages",
    "replicas": "layout.replicas",
    "pretrained": "model.pretrained",
}
EXIT_USER_ERROR = 2


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (later wins: preset, --config, flags, --set)")
    group.add_argument("--model", help="model size: tiny, small, base, large, xl, xxl (picks configs/<size>.yaml)")
    group.add_argument("--config", help="a YAML file of sections model/data/training/validation/layout/output")
    group.add_argument("--max-steps", type=int, help="optimizer steps (training.max_steps)")
    group.add_argument("--output-dir", help="where the run writes (output.output_dir; default runs/<model>)")
    group.add_argument("--task", help="task name (data.task)")
    group.add_argument("--data-files", help="local data as split=PATH pairs: train=a.jsonl,validation=b.jsonl")
    group.add_argument("--pretrained", help="hub id or directory of the starting weights (model.pretrained)")
    group.add_argument("--backend", help="auto, single, torch or ipu (layout.backend)")
    group.add_argument("--stages", type=int, help="pipeline stages per replica (layout.stages)")
    group.add_argument("--replicas", type=int, help="data-parallel replicas (layout.replicas)")
    group.add_argument("--overwrite", action="store_true", help="replace a different run in the output directory")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any config value, e.g. --set training.learning_rate=5e-6 (repeatable)")


def config_from_args(args: argparse.Namespace):
    """The validated RunConfig the flags describe."""
    from .config import load_config
    from .data.sources import parse_data_files

    values: Dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    if args.overwrite:
        values["output.overwrite_output_dir"] = True
    if args.data_files:
        values["data.data_files"] = parse_data_files(args.data_files)
        values["data.source"] = "files"
    return load_config(args.model, args.config, args.overrides, **values)


def _offline_if_possible(config) -> None:
    """A run that needs nothing from the hub (random weights, demo data or local files, a local
    tokenizer) is made explicitly offline, so no library stalls retrying a network it lacks."""
    from .models import canonical_size

    needs_hub = (config.model.pretrained is None and canonical_size(config.model.name).hub_id) or \
        config.data.source == "hub" or any(
            v and not Path(v).exists() for v in (config.model.pretrained, config.model.tokenizer))
    if not needs_hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _table(rows: List[List[str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join("  {}  {}".format(r[0].ljust(width), r[1]) for r in rows)


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune, validate, export, reload the export with plain transformers, print a summary."""
    from .export import reload_and_predict
    from .trainer import T5Trainer

    config = config_from_args(args)
    _offline_if_possible(config)
    trainer = T5Trainer(config)
    try:
        summary = trainer.train()
        results = None
        if trainer.eval_features is not None:
            # Training that stopped early has just validated this very step.
            last = trainer.last_eval
            results = last if last is not None and last["step"] == trainer.step else trainer.evaluate()
        hf_dir = trainer.save_hf_checkpoint()
        if not trainer.is_main_process:
            return 0
        rows = [["steps", str(summary["steps"])],
                ["train samples/s", "{:.1f}".format(summary["samples_per_second"])],
                ["final loss", "{:.4f}".format(summary["final_loss"]) if summary["final_loss"] is not None else "-"]]
        if results is not None:
            predictions = [json.loads(line) for line in open(config.output_dir / "eval_predictions.jsonl")]
            sample = predictions[:256]
            reloaded = reload_and_predict(hf_dir, [p["prompt"] for p in sample])
            same = sum(r == p["generated"] for r, p in zip(reloaded, sample))
            example = sample[0]
            rows += [["validation accuracy", "{:.2%} of {} ({} split, {} invalid)".format(
                         results["accuracy"], results["num_samples"], config.data.eval_split, results.get("invalid", 0))],
                     ["validation samples/s", "{:.1f}".format(results["samples_per_second"])],
                     ["export", "{} (reloaded with plain transformers: {}/{} predictions identical)".format(
                         hf_dir, same, len(sample))],
                     ["example", "{!r} -> {!r} (target {!r})".format(
                         example["prompt"], reloaded[0], example["target"])]]
            summary.update({"accuracy": results["accuracy"], "export_predictions_identical": same,
                            "export_predictions_checked": len(sample)})
        else:
            rows.append(["export", str(hf_dir)])
        summary["export"] = str(hf_dir)
        with open(config.output_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print("\nipu-t5 run summary\n" + _table(rows))
        if results is not None and same != len(sample):
            raise UserError("the reloaded export predicted differently from validation on {} of {} prompts: "
                            "the export at {} is not faithful.".format(len(sample) - same, len(sample), hf_dir))
        return 0
    finally:
        trainer.close()


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Validate an export (default: the run's own <output-dir>/hf) by generation."""
    from .trainer import T5Trainer

    config = config_from_args(args)
    if config.model.pretrained is None and (config.output_dir / "hf" / "config.json").is_file():
        config.model.pretrained = str(config.output_dir / "hf")
    _offline_if_possible(config)
    trainer = T5Trainer(config, pretrained=config.model.pretrained)
    try:
        results = trainer.evaluate()
        if trainer.is_main_process:
            print(json.dumps({k: v for k, v in results.items()}, indent=2))
        return 0
    finally:
        trainer.close()


def cmd_export(args: argparse.Namespace) -> int:
    """Turn a training checkpoint into a plain Hugging Face checkpoint."""
    import torch

    from .checkpoint import read_checkpoint
    from .export import write_hf_checkpoint

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    checkpoint = read_checkpoint(Path(args.checkpoint))
    out = write_hf_checkpoint(Path(args.out), checkpoint["model"], checkpoint["hf_config"], checkpoint["tokenizer"],
                              checkpoint["run_config"], dtype=dtypes[args.dtype])
    print("exported {} (step {}) to {}".format(args.checkpoint, checkpoint["trainer_state"]["step"], out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipu-t5", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate,export}")
    commands.required = True
    train = commands.add_parser("train", help="fine-tune, validate and export")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)
    evaluate = commands.add_parser("evaluate", help="generation-based validation of an export")
    _add_config_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    export = commands.add_parser("export", help="turn a training checkpoint into a Hugging Face checkpoint")
    export.add_argument("checkpoint", help="a checkpoint directory (<output-dir>/checkpoints/step-N)")
    export.add_argument("--out", required=True, help="where to write the Hugging Face checkpoint")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `ipu-t5` console script and `python -m ipu_t5`."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print("ipu-t5: error: {}".format(err), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ipu-t5: interrupted", file=sys.stderr)
        return 130
