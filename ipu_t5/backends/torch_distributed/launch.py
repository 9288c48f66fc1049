"""Multi-process runs: `ipu-t5 train|evaluate` re-runs itself under torchrun's elastic launcher, one
process per stage x replica, and reports a failed rank as one line.

torchrun's agent watches the workers: when one fails it stops the others, so a failure on any rank
ends the run (collectives also time out after `layout.ddp_timeout` seconds rather than hang), or,
with `--max-restarts N`, starts them all again up to N times; a restarted worker continues the run
from its newest intact checkpoint (`restart_count`). Every
rank's output goes to its own log under `<output-dir>/logs/` (`ipu_t5.backends.torch_distributed.rank_logs`); the terminal
shows rank 0's. A worker that fails records its message in torchrun's per-worker error file (a
`UserError` prints nothing else; another exception writes its traceback to the rank's log only),
and the launcher prints one line: the rank that failed first and how, where the logs are, and the
command that resumes the run.
"""
import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Tuple

from ...errors import UserError
from .rank_logs import TRACEBACK_MARK, ConsoleEcho, attempt_dir

# Set in the workers this launcher starts, so they leave the reporting to it.
LAUNCHER_ENV = "IPU_T5_LAUNCHER"
EXIT_USER_ERROR = 2


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun (or another env:// launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """torchrun's flags for runs over several nodes (one node needs none of them), and its restarts."""
    # 0, as torchrun: a restart repeats whatever failed, a deterministic failure (bad data, an
    # exhausted disk, a loss that turns non-finite) as well, and without checkpoints from step 0.
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="after a process fails, start every process again up to N times, each time "
                             "continuing from the newest checkpoint (torchrun's flag; default 0: a failure "
                             "ends the run)")
    group = parser.add_argument_group("several nodes (passed to torchrun; one node needs none)")
    group.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    group.add_argument("--node-rank", type=int, help="this node's index, with --master-addr (static rendezvous)")
    group.add_argument("--nproc-per-node", type=int, help="processes on this node (default: stages x replicas / nnodes)")
    group.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous every node joins")
    group.add_argument("--rdzv-id", default="ipu-t5", help="rendezvous id shared by the nodes of one run")
    group.add_argument("--master-addr", help="address of node 0, with --node-rank")
    group.add_argument("--master-port", type=int, help="port on node 0, with --node-rank")


def restart_count() -> int:
    """How many times torchrun's agent has restarted this worker's group (0: the first attempt, or
    not a torchrun worker): a restarted worker continues its run instead of starting it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) if launched_by_torchrun() else 0


def resume_after_restart(config) -> Optional[str]:
    """Where a restarted worker continues its run from: the newest intact checkpoint of its output
    directory (as `--resume auto`) once the run has written one there; before that, where the first
    attempt started (`--resume PATH`, or step 0 over the first attempt's own output)."""
    from ...checkpointing import list_steps, run_dir

    if not list_steps(config.output_dir):
        return config.output.resume_from_checkpoint
    # Checkpoints of another run that --overwrite was to replace before the first attempt failed.
    if run_dir.holds_other_run(config.output_dir, config.to_dict(), overwrite=True):
        return config.output.resume_from_checkpoint
    return "auto"


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
    if args.max_restarts < 0:
        raise UserError("--max-restarts must be 0 or more, got {}.".format(args.max_restarts))
    # Every rendezvous takes it: each node's agent restarts its own processes, and they meet again.
    out = ["--nnodes", str(nnodes), "--nproc-per-node", str(per_node), "--max-restarts", str(args.max_restarts)]
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


def record_failure(message: str, peer_lost: bool = False) -> bool:
    """In a worker this launcher started, write `message` where torchrun collects the rank's
    failure, and return True (the launcher prints it); elsewhere return False. `peer_lost`: the
    failure only reports that another rank vanished."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(LAUNCHER_ENV) and path):
        return False
    with open(path, "w") as f:
        json.dump({"message": message, "timestamp": time.time(), "peer_lost": peer_lost}, f)
    return True


# What a rank raises when another rank's process is gone: gloo's closed or reset connections,
# NCCL's aborted communicator. (A collective timeout is not here: the rank that waited names a hang.)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
             "remote process exited")


def lost_a_peer(err: Optional[BaseException]) -> bool:
    """Whether `err`, or an error it was raised from (the pipeline schedule wraps a failed receive in
    "Failed to run stage backward"), only says that another rank vanished."""
    for _ in range(8):
        if err is None:
            return False
        if isinstance(err, (RuntimeError, OSError)) and any(text in str(err) for text in PEER_LOST):
            return True
        err = err.__cause__ or err.__context__
    return False


def record_crash(err: BaseException) -> bool:
    """In a worker this launcher started, record an unexpected exception for the launcher's report
    and write its traceback to this rank's log, past the point where the terminal's copy of rank
    0 stops; return True. Elsewhere return False (the caller lets it propagate)."""
    first = str(err).strip().splitlines()
    if not record_failure("{}: {}".format(type(err).__name__, first[0] if first else ""), lost_a_peer(err)):
        return False
    sys.stdout.flush()
    print("\n" + TRACEBACK_MARK, file=sys.stderr)
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    sys.stderr.flush()
    return True


def _recorded(failure) -> Optional[str]:
    """The message a failed worker recorded with `record_failure`, if any."""
    if os.path.isfile(failure.error_file) and isinstance(failure.message, str):
        return failure.message
    return None


# The agent stops the remaining ranks with these once one has failed...
STOP_SIGNALS = ("SIGTERM", "SIGINT")
# ... and kills those still running 30 s later: a signal noticed this long after the first failure
# is the agent's, not the cause.
AGENT_KILL_SECONDS = 25


def _first_cause(failures):
    """Sort key for `failures`: the rank that failed on its own first. Ranks that only saw a peer
    vanish, or that the agent stopped, come after any that failed by itself (an error, an exit
    code, a signal such as SIGKILL from outside), whatever the order their exits were noticed in
    (a signal's time is when the agent noticed it; an error's is when the rank recorded it); among
    those alone, the earliest."""
    def when(failure) -> float:
        data = failure.error_file_data if _recorded(failure) is not None else {}
        return float(data.get("timestamp", failure.timestamp))

    first = min(when(f) for f in failures.values())

    def key(item) -> tuple:
        rank, failure = item
        if failure.exitcode < 0:
            consequence = failure.signal_name() in STOP_SIGNALS or when(failure) > first + AGENT_KILL_SECONDS
        else:
            consequence = _recorded(failure) is not None and bool(failure.error_file_data.get("peer_lost"))
        return consequence, when(failure), rank

    return key


def _report(failures) -> Tuple[str, int]:
    """One line for a failed run, and its exit status: the rank that failed first on its own (see
    `_first_cause`), named unless every rank failed with the same message."""
    rank, failure = min(failures.items(), key=_first_cause(failures))
    message = _recorded(failure)
    status = failure.exitcode if failure.exitcode > 0 else 1
    if message is None:
        if failure.exitcode < 0:
            return "rank {} was killed by signal {}.".format(rank, failure.signal_name()), status
        return "rank {} exited with code {} without a message.".format(rank, failure.exitcode), status
    shared = all(f.exitcode > 0 and _recorded(f) == message for f in failures.values())
    return (message if shared else "{} (rank {})".format(message, rank)), status


def _where(log_dir: Optional[Path], resume: Optional[str]) -> str:
    """What follows a crash: where each rank's output is, and the command that continues the run."""
    text = ""
    attempt = attempt_dir(log_dir) if log_dir is not None else None
    if attempt is not None:
        text += " Each rank's full output is in {}/<local rank>/stdout.log and stderr.log.".format(attempt)
    if resume:
        text += " Resume with: {}".format(resume)
    return text


def launch(world_size: int, argv: List[str], args: argparse.Namespace, module: str = "ipu_t5",
           log_dir: Optional[Path] = None, resume: Optional[str] = None) -> int:
    """Run `python -m module argv` as `world_size` processes under torchrun's elastic agent; returns
    the exit status (0, or the failing rank's). With `log_dir`, every rank's output goes to its
    log there and the terminal shows local rank 0's; `resume` is the command a failure report
    ends with."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = torchrun_args(world_size, args)
    per_node = int(command[command.index("--nproc-per-node") + 1])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    os.environ[LAUNCHER_ENV] = "1"
    if args.max_restarts:
        # Restarted workers that share the rendezvous' store with the agent can read their peers'
        # addresses of the failed attempt and fail to connect (pytorch/pytorch#135712): each
        # attempt gets a store of its own.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if log_dir is not None:
        # Written to files, the workers' output would otherwise reach the terminal in blocks.
        os.environ["PYTHONUNBUFFERED"] = "1"
        command += ["--log-dir", str(log_dir), "--redirects", "3"]
    # The agent logs every worker's exit itself; the failure is reported below, once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    echo = ConsoleEcho(log_dir) if log_dir is not None else None
    try:
        with echo or contextlib.nullcontext():
            run(parse_args(command + ["--module", module] + list(argv)))
    except ChildFailedError as err:
        message, status = _report(err.failures)
        # Bad input names its own fix; anything else points to the logs and the way on.
        where = _where(log_dir, resume) if status != EXIT_USER_ERROR else ""
        print("{}ipu-t5: error: {}{}".format(_new_line(echo), message, where), file=sys.stderr)
        return status
    except SignalException as err:
        print("{}ipu-t5: stopped by signal {}".format(_new_line(echo), err.sigval.name), file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


def _new_line(echo: Optional[ConsoleEcho]) -> str:
    return "\n" if echo is not None and echo.mid_line else ""


def maybe_launch(config, argv: Optional[List[str]], args: argparse.Namespace,
                 resume: Optional[str] = None) -> Optional[int]:
    """When the config's layout needs several torch.distributed processes and this process is not
    one of them, run them and return the exit status; otherwise None (run here). Their logs go
    to `<output-dir>/logs/<start time>-<pid>/`; `resume` ends a failure's report."""
    from ...checkpointing import lock, run_dir
    from ...layout import check_pipeline_fill, plan_from_config
    from .. import resolve_backend_name

    # Layout errors surface here, before any process starts.
    plan = plan_from_config(config)
    if plan.world_size == 1 or launched_by_torchrun() or resolve_backend_name(config, plan) != "torch":
        return None
    check_pipeline_fill(plan)
    # Another run's directory is refused before anything is written into it.
    run_dir.holds_other_run(config.output_dir, config.to_dict(), config.output.overwrite_output_dir)
    argv = sys.argv[1:] if argv is None else argv
    # One writer per run directory: the launcher holds the lock for its workers and their restarts.
    # Over several nodes each node has a launcher, so the main worker takes it instead.
    with lock.for_workers(config.output_dir, " ".join(["ipu-t5"] + list(argv))[:200]) \
            if getattr(args, "nnodes", 1) == 1 else contextlib.nullcontext():
        log_dir = config.output_dir / run_dir.LOGS / "{}-{}".format(time.strftime("%Y%m%d-%H%M%S"), os.getpid())
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError("cannot write the ranks' logs under output directory '{}': {}. Choose another "
                            "--output-dir.".format(config.output_dir, err.strerror or err)) from None
        return launch(plan.world_size, argv, args, log_dir=log_dir, resume=resume)
