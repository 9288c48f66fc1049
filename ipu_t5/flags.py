"""What every command shares before it runs: its config flags, the validated config they describe
(the preset, `--config`, dedicated flags, then `--set`, later winning), and the lock on the run
directory it writes."""
import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

# Dedicated flags and the config keys they set.
FLAG_KEYS = {
    "max_steps": "training.max_steps",
    "output_dir": "output.output_dir",
    "task": "data.task",
    "backend": "layout.backend",
    "stages": "layout.stages",
    "replicas": "layout.replicas",
    "pretrained": "model.pretrained",
    "resume": "output.resume_from_checkpoint",
    "save_every": "output.save_steps",
    "peft": "peft.method",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (later wins: preset, --config, flags, --set)")
    group.add_argument("--model", help="model size: tiny, small, base, large, xl, xxl (picks configs/<size>.yaml)")
    group.add_argument("--config", help="a YAML file of sections model/data/training/validation/layout/output")
    group.add_argument("--max-steps", type=int, help="optimizer steps (training.max_steps)")
    group.add_argument("--output-dir", help="where the run writes (output.output_dir; default runs/<model>)")
    group.add_argument("--task", help="task name (data.task)")
    group.add_argument("--data-files", help="local data as split=PATH pairs: train=a.jsonl,validation=b.jsonl")
    group.add_argument("--pretrained", help="hub id or directory of the starting weights (model.pretrained)")
    group.add_argument("--peft", choices=["none", "lora", "prompt_tuning"],
                       help="lora: train only LoRA adapters (peft.method; rank etc. with --set peft.r=16 ...); "
                            "prompt_tuning: only a soft prompt (--set peft.num_virtual_tokens=20 ...)")
    group.add_argument("--backend", help="auto, single, torch or ipu (layout.backend)")
    group.add_argument("--stages", type=int, help="pipeline stages per replica (layout.stages)")
    group.add_argument("--replicas", type=int, help="data-parallel replicas (layout.replicas)")
    group.add_argument("--ipu-config", help="an optimum-graphcore ipu_config.json whose settings apply "
                       "(after --config, before flags and --set); fields that do not apply are named in a warning")
    group.add_argument("--overwrite", action="store_true", help="replace a different run in the output directory")
    group.add_argument("--ignore-memory-plan", action="store_true",
                       help="start even where the memory plan says the layout does not fit (layout.check_memory=false)")
    group.add_argument("--resume", metavar="auto|PATH",
                       help="continue from the newest intact checkpoint of the output directory (auto), or from "
                            "the checkpoint at PATH (output.resume_from_checkpoint)")
    group.add_argument("--save-every", type=int, metavar="N", help="write a checkpoint every N steps (output.save_steps)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any config value, e.g. --set training.learning_rate=5e-6 (repeatable)")


def config_from_args(args: argparse.Namespace):
    """The validated RunConfig the flags describe."""
    from .config import load_config

    values: Dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    overrides = list(args.overrides)
    if args.ipu_config:
        from .backends.ipu.ipu_config import read_ipu_config

        imported, warnings = read_ipu_config(args.ipu_config)
        for warning in warnings:
            print("ipu-t5: warning: {}".format(warning), file=sys.stderr)
        overrides = imported + overrides
    if args.overwrite:
        values["output.overwrite_output_dir"] = True
    if getattr(args, "ignore_memory_plan", False):
        values["layout.check_memory"] = False
    if args.data_files:
        # Here only: the data code imports `datasets`, which the multi-process launcher does not need.
        from .data.sources import parse_data_files

        values["data.data_files"] = parse_data_files(args.data_files)
        values["data.source"] = "files"
    return load_config(args.model, args.config, overrides, **values)


def offline_if_possible(config) -> None:
    """A run that needs nothing from the hub (random weights, demo data or local files, a local
    tokenizer) is made explicitly offline, so no library stalls retrying a network it lacks."""
    from .models import canonical_size

    needs_hub = (config.model.pretrained is None and canonical_size(config.model.name).hub_id) or \
        config.data.source == "hub" or any(
            v and not Path(v).exists() for v in (config.model.pretrained, config.model.tokenizer))
    if not needs_hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def writing(directory: Path, argv: List[str], config=None):
    """The lock on the run directory a command writes, held while the command runs; with `config`,
    another run's directory is refused first, before a lock file is left in it. The workers of a
    multi-process run take none here: their launcher holds it, or (torchrun started by hand) their
    trainer's main process takes it at its first write."""
    from .backends.torch_distributed.launch import launched_by_torchrun
    from .checkpointing import lock, run_dir

    # A directory not made yet is locked by the trainer's first write, which makes it: a command
    # refused before then (bad data, say) leaves nothing behind.
    if launched_by_torchrun() or not Path(directory).is_dir():
        return contextlib.nullcontext()
    if config is not None:
        run_dir.holds_other_run(directory, config.to_dict(), config.output.overwrite_output_dir)
    return lock.hold(directory, " ".join(["ipu-t5"] + list(argv))[:200])
