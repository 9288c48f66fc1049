"""Graceful stop on SIGTERM / SIGINT: the first signal asks the training loop to finish its step and
write a checkpoint; a second one exits at once.

Preemption (Kubernetes, Slurm, spot instances) sends SIGTERM and waits a grace period before
SIGKILL; a user presses Ctrl-C. Either way the work since the last checkpoint is saved. The second
signal uses `os._exit`, so no cleanup code runs that could touch the last good checkpoint; a
checkpoint being written then stays an unfinished staging directory that the next save removes.
"""
import os
import signal
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager that turns the first SIGTERM/SIGINT into a request (`requested` holds the
    signal's name) and the second into an immediate exit with status 128 + signal number.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write("\nipu-t5: second {}: exiting now; the last complete checkpoint is untouched.\n".format(name))
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = name
        # On a fresh line: a progress bar may be mid-line.
        sys.stderr.write("\nipu-t5: {} received: finishing this step, then writing a checkpoint "
                         "({} again to exit at once).\n".format(name, name))
        sys.stderr.flush()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
