"""One writer per run directory: `<output-dir>/.lock`, an OS lock held by the process that writes.

The lock is `fcntl.flock` on the open file, so it dies with its process: a process killed with
SIGKILL, or whose machine is lost, blocks nobody afterwards (on NFS once the server drops the lost
client's lease). The file also records who holds it (pid, host, command, since when) in JSON, so a
second writer is told which run is live. A lock is a property of a process: later holders in the
same process (a notebook kernel that builds a new `T5Trainer` for the directory, the CLI command
around its trainer) share it, and it is released when the last one lets go.

A multi-process run is locked by its launcher; the workers it starts find the directory named in
`HELD_ENV` and take nothing (torchrun's restarts run under the same launcher, and so the same lock).
"""
import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from ..errors import UserError

LOCK_FILE = ".lock"
# Set by a launcher that holds the lock for its workers: the run directory's resolved path.
HELD_ENV = "IPU_T5_RUN_LOCK"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are unlocked
    fcntl = None


class _Held:
    """The open lock file of one directory in this process, and how many holders share it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.holders = 0


# This process's locks by directory. flock belongs to an open file, so a second open of the same
# file in this process would refuse this very process; the process opens each lock file once.
_HELD: Dict[str, _Held] = {}


def lock_path(directory: Path) -> Path:
    return Path(directory) / LOCK_FILE


def _key(directory: Path) -> str:
    return str(Path(directory).resolve())


def holder(directory: Path) -> Optional[Dict[str, object]]:
    """What the lock file says about its holder (whoever last held it; it may be gone)."""
    try:
        return json.loads(lock_path(directory).read_text() or "null")
    except (OSError, ValueError):
        return None


def _busy(directory: Path) -> UserError:
    who = holder(directory) or {}
    return UserError("output directory '{}' is being written by another run: pid {} on host {} ({}), since {}. Wait "
                     "for it to end, or stop it and continue with --resume auto; a second writer would mix their "
                     "files.".format(directory, who.get("pid", "?"), who.get("host", "?"),
                                     who.get("command", "ipu-t5"), who.get("started", "?")))


def _record(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _open_locked(directory: Path) -> Tuple[Optional[int], bool]:
    """(fd, locked): the lock file open and flocked; (None, False) where the filesystem has no locks."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd = os.open(str(lock_path(directory)), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError("cannot write output directory '{}': {}. Choose another --output-dir.".format(
            directory, err.strerror or err)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(directory) from None
    except OSError as err:  # ENOLCK, EOPNOTSUPP: a filesystem mounted without locks
        os.close(fd)
        print("ipu-t5: warning: cannot lock {} ({}); nothing stops a second run from writing there.".format(
            lock_path(directory), err.strerror or err), file=sys.stderr)
        return None, False
    return fd, True


def covered_by_launcher(directory: Path) -> bool:
    """Whether a launcher holds this directory's lock for this process (a worker it started)."""
    return os.environ.get(HELD_ENV) == _key(directory)


def acquire(directory: Path, command: str) -> bool:
    """Take the lock on `directory` (created if missing) for `command`; a UserError naming the live
    holder if another process has it. Returns whether a `release` is owed."""
    if fcntl is None or covered_by_launcher(directory):
        return False
    key = _key(directory)
    held = _HELD.get(key)
    if held is None:
        fd, locked = _open_locked(directory)
        if not locked:
            return False
        _record(fd, command)
        held = _HELD[key] = _Held(fd)
    held.holders += 1
    return True


def release(directory: Path) -> None:
    """Let go of one `acquire`; the lock goes when its last holder in this process lets go."""
    key = _key(directory)
    held = _HELD.get(key)
    if held is None:
        return
    held.holders -= 1
    if held.holders <= 0:
        del _HELD[key]
        # Emptied first, so the file no longer names a live run; then the lock itself goes.
        os.ftruncate(held.fd, 0)
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


@contextlib.contextmanager
def hold(directory: Path, command: str) -> Iterator[None]:
    """The lock on `directory` for the duration of a `with` block (`ipu-t5 train`, `evaluate`,
    `export`, `predict`)."""
    owed = acquire(directory, command)
    try:
        yield
    finally:
        if owed:
            release(directory)


@contextlib.contextmanager
def for_workers(directory: Path, command: str) -> Iterator[None]:
    """A launcher's lock on `directory`, announced to the workers it starts in this block."""
    with hold(directory, command):
        previous = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = _key(directory)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = previous
