"""`ipu-t5 train | evaluate | predict | export | plan | backend`: flags become config overrides.

This is the one place that turns a UserError into a single line and a non-zero exit."""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .backends.torch_distributed.launch import (add_cluster_flags, maybe_launch, quiet_unless_main, record_crash,
                                               record_failure, restart_count, resume_after_restart)
from .errors import UserError
from .flags import add_config_flags, config_from_args, offline_if_possible, writing
from .plan_cli import add_plan_command

EXIT_USER_ERROR = 2


def _table(rows: List[List[str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join("  {}  {}".format(r[0].ljust(width), r[1]) for r in rows)


def _score(value: float) -> str:
    # Scores in [0, 1] (accuracy, ROUGE, exact match) read best as percentages; others as they are.
    return "{:.2%}".format(value) if 0.0 <= value <= 1.0 else "{:.4g}".format(value)


def _results_row(results: Dict[str, Any]) -> List[str]:
    """The summary line of an evaluation: the task's main score first, then the others."""
    main = results["main_metric"]
    others = ", ".join("{} {}".format(k, _score(results[k])) for k in results["metrics"] if k != main)
    text = _score(results[main]) + (" ({})".format(others) if others else "")
    text += " on {} samples".format(results["num_samples"])
    if results.get("split"):
        text += " of the {} split".format(results["split"])
    if "invalid" in results:
        text += ", {} invalid".format(results["invalid"])
    return ["validation " + main, text]


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune, validate, export, reload the export with plain transformers, print a summary."""
    config = config_from_args(args)
    offline_if_possible(config)
    launched = maybe_launch(config, args.argv, args, resume=resume_command(args.argv))
    if launched is not None:
        return launched
    with writing(config.output_dir, args.argv, config):
        return _train(config, args)


def _train(config, args: argparse.Namespace) -> int:
    # Imported after the launch: the launcher of a multi-process run needs none of them.
    from . import lora
    from .checkpointing.export import fits_in_memory, reload_and_predict
    from .training.trainer import T5Trainer

    # torchrun restarted every process after one failed (--max-restarts): continue, not start over.
    restart = restart_count()
    if restart:
        config.output.resume_from_checkpoint = resume_after_restart(config)
    trainer = T5Trainer(config)
    try:
        if restart:
            trainer.record_restart(restart)
        summary = trainer.train()
        if "interrupted" in summary:
            if trainer.is_main_process:
                print("ipu-t5: resume with: {}".format(resume_command(args.argv)))
            return 0
        trainer.end_training()
        results = None
        if trainer.eval_features is not None:
            # Training that stopped early has just validated this very step.
            last = trainer.last_eval
            results = last if last is not None and last["step"] == trainer.step else trainer.evaluate()
        # The last use of the model: every process frees it before the export's reload check.
        hf_dir = trainer.export_hf(release_model=True)
        if not trainer.is_main_process:
            return 0
        rows = [["steps", str(summary["steps"])],
                ["train samples/s", "{:.1f}".format(summary["samples_per_second"])],
                ["final loss", "{:.4f}".format(summary["final_loss"]) if summary["final_loss"] is not None else "-"]]
        adapter = None
        if lora.enabled(config):
            adapter = config.output_dir / "adapter"
            rows += [["trainable parameters", "{:,} of {:,} ({})".format(
                         trainer.num_trainable, trainer.num_params,
                         "LoRA adapters" if lora.is_lora(config) else "soft prompt")],
                     ["adapter", "{} (peft.PeftModel.from_pretrained)".format(adapter)]]
            summary.update({"trainable_parameters": trainer.num_trainable, "parameters": trainer.num_params,
                            "adapter": str(adapter)})
        if results is not None:
            rows += [_results_row(results), ["validation samples/s", "{:.1f}".format(results["samples_per_second"])]]
            summary.update({k: results[k] for k in results["metrics"]})
            summary["main_metric"] = results["main_metric"]
        # Reloading the export holds the whole model in this process: only where it fits.
        fits, memory = fits_in_memory(trainer.hf_config)
        if results is not None and fits:
            predictions = [json.loads(line) for line in open(config.output_dir / "eval_predictions.jsonl")]
            sample = predictions[:256]
            # A soft prompt's export is the base: it predicts as validation did with the adapter over it.
            reloaded = reload_and_predict(hf_dir, [p["prompt"] for p in sample],
                                          bf16=results.get("precision") == "bfloat16",
                                          adapter=None if lora.is_lora(config) else adapter)
            same = sum(r == p["generated"] for r, p in zip(reloaded, sample))
            example = sample[0]
            rows += [["export", "{} (reloaded with plain transformers: {}/{} predictions identical)".format(
                         hf_dir, same, len(sample))],
                     ["example", "{!r} -> {!r} (target {!r})".format(
                         example["prompt"], reloaded[0], example["target"])]]
            summary.update({"export_predictions_identical": same, "export_predictions_checked": len(sample)})
        elif results is not None:
            rows.append(["export", "{} (its predictions were not reloaded with plain transformers: {})".format(
                hf_dir, memory)])
        else:
            rows.append(["export", str(hf_dir)])
        summary["export"] = str(hf_dir)
        with open(config.output_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print("\nipu-t5 run summary\n" + _table(rows))
        if results is not None and fits and same != len(sample):
            raise UserError("the reloaded export predicted differently from validation on {} of {} prompts: "
                            "the export at {} is not faithful.".format(len(sample) - same, len(sample), hf_dir))
        return 0
    finally:
        trainer.close()


def resume_command(argv: List[str]) -> str:
    """The command line that continues a stopped run: the same flags, with --resume auto."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return " ".join(["ipu-t5"] + [shlex.quote(a) for a in kept] + ["--resume", "auto"])


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Validate an export (default: the run's own <output-dir>/hf) by generation."""
    config = config_from_args(args)
    # The memory plan counts training (gradients, AdamW moments); validation holds far less.
    config.layout.check_memory = False
    if config.model.pretrained is None and (config.output_dir / "hf" / "config.json").is_file():
        config.model.pretrained = str(config.output_dir / "hf")
    offline_if_possible(config)
    launched = maybe_launch(config, args.argv, args)
    if launched is not None:
        return launched
    from .training.trainer import T5Trainer

    with writing(config.output_dir, args.argv, config):
        trainer = T5Trainer(config, pretrained=config.model.pretrained)
        try:
            results = trainer.evaluate()
            if trainer.is_main_process:
                print(json.dumps({k: v for k, v in results.items()}, indent=2))
            return 0
        finally:
            trainer.close()


def cmd_export(args: argparse.Namespace) -> int:
    """Turn a training checkpoint (or a run's newest one) into a plain Hugging Face checkpoint,
    reloaded and compared with the checkpoint's model before it is put in place; a LoRA run's
    adapter goes beside it."""
    from . import checkpointing, lora
    from .checkpointing.adapter import write_adapter
    from .checkpointing.export import DEFAULT_MAX_SHARD_SIZE, DTYPES, write_hf_checkpoint
    from .config import config_from_dict
    from .data.features import prompt_cap
    from .model_source import run_source
    from .models import canonical_size, parameter_shapes

    source = Path(args.checkpoint)
    if (source / "run_config.yaml").is_file() and not (source / checkpointing.STATE_FILE).exists():
        found = checkpointing.newest_usable(source, lambda line: print(line, file=sys.stderr))
        if found is None:
            raise UserError("{} is a run without checkpoints: train it with output.save_steps set, or give a "
                            "checkpoint directory.".format(source))
    else:
        found = checkpointing.inspect(source)
    state = found.state
    results = state.get("last_eval") if state.get("last_eval_step") == found.step else None
    run_config = config_from_dict(found.run_config())
    tensors, tokenizer, extra = found.model_tensors(), found.tokenizer(), ""
    if lora.enabled(run_config):
        # A LoRA checkpoint holds only the adapter; the base comes from the run's own starting point.
        offline_if_possible(run_config)
        out = Path(args.out)
        adapter_out = Path(args.adapter_out) if args.adapter_out else out.with_name(out.name + "-adapter")
        adapters = dict(tensors)
        # The base weights as the run started from them, read or drawn one at a time while merged.
        origin = run_source(run_config, len(tokenizer))
        expected = {k: tuple(v.shape) for k, v in lora.adapter_state(origin.meta_model().state_dict()).items()}
        if {k: tuple(v.shape) for k, v in adapters.items()} != expected:
            raise UserError("the checkpoint's adapter does not fit the model its config builds ({} tensors where the "
                            "config's LoRA has {}): was the checkpoint written by this run?".format(
                                len(adapters), len(expected)))
        base = run_config.model.pretrained or canonical_size(run_config.model.name).hub_id
        if not lora.is_lora(run_config):  # a soft prompt goes with the base this export holds
            base, results = str(out.resolve()), None
        write_adapter(adapter_out, adapters, run_config.peft, base, tokenizer, origin.hf_config)
        tensors = lora.MergedWeights(origin.tensor, parameter_shapes(origin.hf_config), adapters, run_config.peft)
        extra = " (LoRA merged; adapter in {})".format(adapter_out)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Checkpoints before the prompt length was recorded truncated at the configured cap.
    prompt_length = state.get("prompt_length") or prompt_cap(run_config.data.max_source_length)
    # An export into a run directory (its hf/) is that run's writer while it writes.
    run = Path(args.out).parent
    with writing(run, args.argv) if (run / "run_config.yaml").is_file() else contextlib.nullcontext():
        exported = write_hf_checkpoint(Path(args.out), tensors, found.hf_config(), tokenizer, found.run_config(),
                                       results, state.get("max_new_tokens"), DTYPES[args.dtype],
                                       args.max_shard_size or DEFAULT_MAX_SHARD_SIZE, prompt_length=prompt_length)
    print("{}{} (from {}, step {})".format(exported.describe(), extra, found.path, found.step))
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    """Print the backend the flags resolve to and how many processes it runs as (the IPU backend is
    one process driving every IPU, never torchrun)."""
    from .backends import resolve_backend_name
    from .layout import plan_from_config

    config = config_from_args(args)
    layout = plan_from_config(config)
    name = resolve_backend_name(config, layout)
    print(name, 1 if name in ("single", "ipu") else layout.world_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipu-t5", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,export,plan,backend}")
    commands.required = True
    train = commands.add_parser("train", help="fine-tune, validate and export")
    add_config_flags(train)
    add_cluster_flags(train)
    train.set_defaults(func=cmd_train)
    evaluate = commands.add_parser("evaluate", help="generation-based validation of an export")
    add_config_flags(evaluate)
    add_cluster_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    from .predict_cli import add_predict_command

    add_predict_command(commands, add_config_flags, add_cluster_flags)
    export = commands.add_parser("export", help="turn a training checkpoint into a Hugging Face checkpoint")
    export.add_argument("checkpoint", help="a checkpoint directory (<output-dir>/checkpoints/step-N), or a run's "
                                           "output directory for its newest intact checkpoint")
    export.add_argument("--out", required=True, help="where to write the Hugging Face checkpoint")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights (default float32)")
    export.add_argument("--max-shard-size", metavar="SIZE",
                        help="largest weight file; bigger models are sharded with an index file, as "
                             "save_pretrained does (default 5GB)")
    export.add_argument("--adapter-out", help="where a LoRA run's adapter goes (default: <out>-adapter)")
    export.set_defaults(func=cmd_export)
    add_plan_command(commands, add_config_flags)
    backend = commands.add_parser("backend", help="print the backend and process count the flags resolve to")
    add_config_flags(backend)
    backend.set_defaults(func=cmd_backend)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `ipu-t5` console script and `python -m ipu_t5`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Workers of a multi-process run are started with the same arguments.
    args.argv = argv
    try:
        quiet_unless_main()
        return args.func(args)
    except UserError as err:
        if not record_failure(str(err)):
            # Some refusals carry a table (the per-IPU memory plan) to show before their one line.
            details = getattr(err, "details", None)
            if details:
                print(details, file=sys.stderr)
            print("ipu-t5: error: {}".format(err), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ipu-t5: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # A worker of a multi-process run leaves the report to the launcher, its traceback to its log.
        if record_crash(err):
            return 1
        raise
