"""Per-rank logs of a multi-process run, and the terminal's live view of rank 0.

torchrun's agent redirects every worker's stdout and stderr into files (`--log-dir`,
`--redirects 3`): `<log dir>/<run id>_<random>/attempt_<n>/<local rank>/{stdout,stderr}.log`, so
each rank's full output, native library messages included, is kept. The terminal shows local rank
0 as before by copying its two files as they grow, byte for byte: progress bars redrawn with
carriage returns stay live, with no per-line prefix (torchrun's own `--tee` reads whole lines and
prefixes each one). A worker that fails writes `TRACEBACK_MARK` before its traceback; the copy
stops there, so the terminal shows the launcher's one-line report instead while the log keeps the
traceback.
"""
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Dict, Optional

TRACEBACK_MARK = "ipu-t5: this rank's traceback (kept in its log; the launcher reports the failure):"


def attempt_dir(log_dir: Path) -> Optional[Path]:
    """The newest attempt directory torchrun made under `log_dir` (one launch per `log_dir`)."""
    found = sorted(Path(log_dir).glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    return found[-1] if found else None


def _binary(stream) -> BinaryIO:
    return getattr(stream, "buffer", stream)


class _Copy:
    """One log file copied to one stream, up to `TRACEBACK_MARK` at the start of a line."""

    def __init__(self, destination):
        self.destination = destination
        self.source: Optional[BinaryIO] = None
        self.held = b""
        self.stopped = False
        self.last = b"\n"

    def pump(self, path: Path, final: bool) -> None:
        if self.stopped:
            return
        if self.source is None:
            if not path.is_file():
                return
            self.source = open(str(path), "rb")
        data = self.held + self.source.read()
        mark = b"\n" + TRACEBACK_MARK.encode()
        at = data.find(mark)
        if at >= 0:
            data, self.stopped = data[:at + 1], True
            self.held = b""
        elif not final:
            # A line end that may begin the mark waits for the bytes that tell.
            end = data.rfind(b"\n")
            if end >= 0 and mark.startswith(data[end:]):
                data, self.held = data[:end], data[end:]
            else:
                self.held = b""
        if data:
            out = _binary(self.destination)
            out.write(data)
            out.flush()
            self.last = data[-1:]
        if self.stopped or final:
            self.close()

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None


class ConsoleEcho:
    """Copies a local rank's stdout.log and stderr.log under `log_dir` to this process's stdout and
    stderr while a launch runs: `with ConsoleEcho(log_dir): run(...)`."""

    def __init__(self, log_dir: Path, local_rank: int = 0, interval: float = 0.05):
        self.log_dir = Path(log_dir)
        self.local_rank = str(local_rank)
        self.interval = interval
        self._done = threading.Event()
        self._copies: Dict[str, _Copy] = {"stdout.log": _Copy(sys.stdout), "stderr.log": _Copy(sys.stderr)}
        self._attempt: Optional[Path] = None
        self._thread = threading.Thread(target=self._run, name="ipu-t5-console-echo", daemon=True)

    def _pump(self, final: bool) -> None:
        attempt = attempt_dir(self.log_dir)
        if attempt is None:
            return
        if self._attempt is not None and attempt != self._attempt:
            self._next_attempt()
        self._attempt = attempt
        for name, copy in self._copies.items():
            copy.pump(attempt / self.local_rank / name, final)

    def _next_attempt(self) -> None:
        """torchrun restarted the workers (--max-restarts): the rest of the last attempt's files,
        up to a traceback, then the new attempt's from their start, on a line of their own."""
        for name, copy in self._copies.items():
            copy.pump(self._attempt / self.local_rank / name, final=True)
        for copy in self._copies.values():
            if copy.last != b"\n":
                _binary(copy.destination).write(b"\n")
                _binary(copy.destination).flush()
        self._copies = {name: _Copy(copy.destination) for name, copy in self._copies.items()}

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self._pump(final=False)
        self._pump(final=True)

    @property
    def mid_line(self) -> bool:
        """Whether the terminal's cursor was left mid-line (a rank that died while drawing a progress
        bar), so that a message should start on a new line."""
        return any(copy.last != b"\n" for copy in self._copies.values())

    def __enter__(self) -> "ConsoleEcho":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        for copy in self._copies.values():
            copy.close()
