"""`ipu-t5 plan`: where a layout puts each block and what each IPU or process holds, before any
weight is read (no IPU, no GPU, no weights needed)."""
import argparse
import json
import sys

from .errors import UserError
from .flags import config_from_args

# MNLI's targets ("entailment", ...) with their end-of-sequence token are well under this.
DEFAULT_PLAN_TARGET_LENGTH = 8


def add_plan_command(commands, add_config_flags) -> None:
    """The `plan` subcommand and its flags, beside the config flags every command takes."""
    plan = commands.add_parser("plan", help="per-IPU placement and memory of a layout, or with --backend torch the "
                                            "memory of each process (no IPU, no GPU, no weights)")
    add_config_flags(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--source-length", type=int,
                      help="prompt tokens (default: data.max_source_length, else T5's 512; runs use the data's)")
    plan.add_argument("--target-length", type=int, help="target tokens (default: validation.max_new_tokens, else {})"
                      .format(DEFAULT_PLAN_TARGET_LENGTH))
    plan.add_argument("--device-memory", metavar="SIZE",
                      help="plan the torch backend against GPUs of this memory, e.g. 80GB (default with --backend "
                           "torch|single: this machine's GPUs, else its RAM)")
    plan.add_argument("--export-ipu-config", metavar="FILE", help="also write the plan as an optimum-graphcore ipu_config.json")
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """How the layout maps onto IPUs: one row per IPU with its blocks, parameters, bytes on chip and
    streamed, and whether it fits; with --backend torch or single (or --device-memory), one row per
    process of the torch backend. Needs no IPU, no GPU and no weights; exits 2 with the table when
    the layout does not fit."""
    from .backends.ipu.plan import IpuPlanRefused, plan_ipu
    from .data.features import prompt_cap
    from .layout import plan_from_config
    from .models import model_size, size_note

    config = config_from_args(args)
    note = size_note(config, model_size(config))
    if note:
        print("ipu-t5: " + note, file=sys.stderr)
    source = args.source_length or prompt_cap(config.data.max_source_length)
    target = args.target_length or config.validation.max_new_tokens or DEFAULT_PLAN_TARGET_LENGTH
    if config.layout.backend in ("torch", "single") or args.device_memory:
        return _plan_torch(args, config, source, target)
    layout = plan_from_config(config, source, target)
    try:
        plan = plan_ipu(config, layout, source, target)
    except IpuPlanRefused as refused:
        if args.json:
            print(json.dumps({"fits": False, "error": str(refused),
                              "attempts": [a.to_dict() for a in refused.attempts]}, indent=2))
        else:
            print(refused.details)
        raise UserError(str(refused)) from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    if args.export_ipu_config:
        from .backends.ipu.ipu_config import write_ipu_config

        path = write_ipu_config(args.export_ipu_config, config, plan)
        print("wrote {}".format(path), file=sys.stderr)
    return 0


def _plan_torch(args: argparse.Namespace, config, source: int, target: int) -> int:
    """The torch backend's memory per rank, for the cut it would run, against the GPUs' or the host's
    memory; exits 2 with the table when it does not fit."""
    from .backends.batch_search import fitted_plan
    from .backends.torch_distributed.memory import lightest_cut
    from .backends.torch_distributed.memory_report import available_memory, memory_report

    device = available_memory(args.device_memory).device
    layout = fitted_plan(config, source, target, lambda c: lightest_cut(c, source, target, device),
                         args.device_memory)
    report = memory_report(config, source, target, args.device_memory, layout=layout)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if not report.fits:
        raise UserError(report.refusal())
    return 0
