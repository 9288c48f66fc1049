"""Multi-process runs: `ipu-t5 train|evaluate` re-runs itself under torchrun's elastic launcher, one
process per stage x replica, and reports a failed rank as one line.

torchrun's agent watches the workers: when one fails it stops the others, so a failure on any rank
ends the run (collectives also time out after `layout.ddp_timeout` seconds rather than hang). A
worker that fails with a `UserError` records its message in torchrun's per-worker error file and
prints nothing; the launcher prints that rank's message once.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional, Tuple

from ...errors import UserError

# Set in the workers this launcher starts, so they leave the reporting to it.
LAUNCHER_ENV = "IPU_T5_LAUNCHER"
EXIT_USER_ERROR = 2


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun (or another env:// launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """torchrun's flags for runs over several nodes; one node needs none of them."""
    group = parser.add_argument_group("several nodes (passed to torchrun; one node needs none)")
    group.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    group.add_argument("--node-rank", type=int, help="this node's index, with --master-addr (static rendezvous)")
    group.add_argument("--nproc-per-node", type=int, help="processes on this node (default: stages x replicas / nnodes)")
    group.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous every node joins")
    group.add_argument("--rdzv-id", default="ipu-t5", help="rendezvous id shared by the nodes of one run")
    group.add_argument("--master-addr", help="address of node 0, with --node-rank")
    group.add_argument("--master-port", type=int, help="port on node 0, with --node-rank")


def torchrun_args(world_size: int, args: argparse.Namespace) -> List[str]:
    """torchrun's command line for a layout of `world_size` processes."""
    nnodes = args.nnodes
    if nnodes < 1 or world_size % nnodes:
        raise UserError("the layout's {} processes (stages x replicas) do not split evenly over --nnodes {}: "
                        "use a node count that divides {}.".format(world_size, nnodes, world_size))
    per_node = args.nproc_per_node or world_size // nnodes
    if per_node * nnodes != world_size:
        raise UserError("--nnodes {} x --nproc-per-node {} = {} processes, but the layout needs stages x replicas "
                        "= {}.".format(nnodes, per_node, per_node * nnodes, world_size))
    out = ["--nnodes", str(nnodes), "--nproc-per-node", str(per_node)]
    if args.rdzv_endpoint:
        out += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    elif args.master_addr or args.node_rank is not None:
        if nnodes > 1 and (args.node_rank is None or not args.master_addr):
            raise UserError("a static multi-node launch needs both --node-rank and --master-addr (or use "
                            "--rdzv-endpoint HOST:PORT on every node).")
        out += ["--node-rank", str(args.node_rank or 0), "--master-addr", args.master_addr or "127.0.0.1"]
        if args.master_port:
            out += ["--master-port", str(args.master_port)]
    elif nnodes > 1:
        raise UserError("--nnodes {} needs --rdzv-endpoint HOST:PORT (the same on every node), or --node-rank "
                        "and --master-addr.".format(nnodes))
    else:
        out.append("--standalone")
    return out


def quiet_unless_main() -> None:
    """Only rank 0 of a multi-process run shows progress bars, library logs and warnings."""
    if not launched_by_torchrun() or os.environ.get("RANK") == "0":
        return
    import warnings

    import datasets
    import transformers

    warnings.simplefilter("ignore")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def record_failure(message: str) -> bool:
    """In a worker this launcher started, write `message` where torchrun collects the rank's
    failure, and return True (the launcher prints it); elsewhere return False."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(LAUNCHER_ENV) and path):
        return False
    with open(path, "w") as f:
        json.dump({"message": message, "timestamp": int(time.time())}, f)
    return True


def _recorded(failure) -> Optional[str]:
    """The message a failed worker recorded with `record_failure`, if any."""
    if os.path.isfile(failure.error_file) and isinstance(failure.message, str):
        return failure.message
    return None


def _report(failures) -> Tuple[str, int]:
    """One line for a failed run, and its exit status: the earliest rank that failed on its own
    (not stopped by a signal), named unless every rank failed with the same message."""
    rank, failure = min(failures.items(), key=lambda item: (item[1].exitcode < 0, item[1].timestamp, item[0]))
    message = _recorded(failure)
    status = failure.exitcode if failure.exitcode > 0 else 1
    if message is None:
        if failure.exitcode < 0:
            return "rank {} was stopped by signal {}.".format(rank, failure.signal_name()), status
        return "rank {} failed with exit code {}; its output is above.".format(rank, failure.exitcode), status
    shared = all(f.exitcode > 0 and _recorded(f) == message for f in failures.values())
    return (message if shared else "{} (rank {})".format(message, rank)), status


def launch(world_size: int, argv: List[str], args: argparse.Namespace, module: str = "ipu_t5") -> int:
    """Run `python -m module argv` as `world_size` processes under torchrun's elastic agent; returns
    the exit status (0, or the failing rank's)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = torchrun_args(world_size, args)
    per_node = int(command[command.index("--nproc-per-node") + 1])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    os.environ[LAUNCHER_ENV] = "1"
    # The agent logs every worker's exit itself; the failure is reported below, once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(command + ["--module", module] + list(argv)))
    except ChildFailedError as err:
        message, status = _report(err.failures)
        print("ipu-t5: error: {}".format(message), file=sys.stderr)
        return status
    except SignalException as err:
        print("ipu-t5: stopped by signal {}".format(err.sigval.name), file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


def maybe_launch(config, argv: Optional[List[str]], args: argparse.Namespace) -> Optional[int]:
    """When the config's layout needs several torch.distributed processes and this process is not
    one of them, run them and return the exit status; otherwise None (run here)."""
    from .. import resolve_backend_name
    from ...layout import plan_from_config

    # Layout errors surface here, before any process starts.
    plan = plan_from_config(config)
    if plan.world_size == 1 or launched_by_torchrun() or resolve_backend_name(config, plan) != "torch":
        return None
    return launch(plan.world_size, sys.argv[1:] if argv is None else argv, args)
