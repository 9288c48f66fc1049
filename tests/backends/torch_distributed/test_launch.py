"""The launcher's failure report and its live copy of rank 0's log, without starting processes
(tests/test_pipeline.py kills a rank of a real 2 x 2 run)."""
import io
import json
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from ipu_t5.backends.torch_distributed.launch import _report, lost_a_peer
from ipu_t5.backends.torch_distributed.rank_logs import TRACEBACK_MARK, ConsoleEcho, _Copy, attempt_dir

pytestmark = pytest.mark.core

GLOO_CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:646. This is "
               "typically caused by a remote worker crashing.")


def _failure(tmp_path, rank, exitcode, message=None, peer_lost=False, timestamp=0.0):
    error_file = tmp_path / "{}.json".format(rank)
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": timestamp, "peer_lost": peer_lost}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_a_killed_rank_is_named_before_the_ranks_that_lost_it(tmp_path):
    """The ranks that saw the connection close recorded their errors before the agent noticed the
    kill (whose time is when it was noticed): the kill is still the cause."""
    now = time.time()
    failures = {0: _failure(tmp_path, 0, -15),
                1: _failure(tmp_path, 1, 1, "RuntimeError: " + GLOO_CLOSED, peer_lost=True, timestamp=now - 2),
                2: _failure(tmp_path, 2, -9),
                3: _failure(tmp_path, 3, 1, "RuntimeError: Failed to run stage backward:", peer_lost=True,
                            timestamp=now - 1.5)}
    assert _report(failures) == ("rank 2 was killed by signal SIGKILL.", 1)


def test_the_agents_own_late_kill_is_not_the_cause(tmp_path):
    """A rank stuck in a collective ignores the agent's SIGTERM and is killed 30 s later: the ranks
    that lost their connections first are then the only witnesses, and the earliest is named."""
    now = time.time()
    failures = {0: _failure(tmp_path, 0, 1, "RuntimeError: " + GLOO_CLOSED, peer_lost=True, timestamp=now - 31),
                1: _failure(tmp_path, 1, -9),
                2: _failure(tmp_path, 2, 1, "RuntimeError: " + GLOO_CLOSED, peer_lost=True, timestamp=now - 30)}
    assert _report(failures) == ("RuntimeError: " + GLOO_CLOSED + " (rank 0)", 1)


def test_an_error_of_its_own_comes_before_peers_and_stopped_ranks(tmp_path):
    now = time.time()
    failures = {0: _failure(tmp_path, 0, 1, "RuntimeError: " + GLOO_CLOSED, peer_lost=True, timestamp=now - 2),
                1: _failure(tmp_path, 1, 1, "ValueError: bad shape", timestamp=now - 1),
                2: _failure(tmp_path, 2, -15)}
    assert _report(failures) == ("ValueError: bad shape (rank 1)", 1)


def test_a_hang_is_reported_by_the_first_rank_that_timed_out(tmp_path):
    """The hung rank is stopped by the agent (SIGTERM); the ranks that waited for it timed out."""
    now = time.time()
    failures = {0: _failure(tmp_path, 0, 1, "RuntimeError: Timed out waiting 3000ms", timestamp=now - 0.8),
                1: _failure(tmp_path, 1, -15),
                2: _failure(tmp_path, 2, 1, "RuntimeError: Timed out waiting 3000ms", timestamp=now - 0.9)}
    assert _report(failures) == ("RuntimeError: Timed out waiting 3000ms (rank 2)", 1)


def test_the_same_user_error_everywhere_is_named_once(tmp_path):
    failures = {r: _failure(tmp_path, r, 2, "data file 'x' is empty.", timestamp=float(r)) for r in range(3)}
    assert _report(failures) == ("data file 'x' is empty.", 2)


def test_an_exit_code_without_a_message(tmp_path):
    failures = {0: _failure(tmp_path, 0, 3), 1: _failure(tmp_path, 1, -15)}
    assert _report(failures) == ("rank 0 exited with code 3 without a message.", 3)


def test_lost_a_peer_follows_the_chain_and_leaves_timeouts_and_bugs_alone():
    try:
        try:
            raise RuntimeError("Got the following error when running the callback: " + GLOO_CLOSED)
        except RuntimeError as inner:
            raise RuntimeError("Failed to run stage backward:") from inner
    except RuntimeError as wrapped:
        assert lost_a_peer(wrapped)
    assert lost_a_peer(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:12012: Connection reset by peer"))
    assert not lost_a_peer(RuntimeError("[pair.cc:446] Timed out waiting 3000ms for recv operation to complete"))
    assert not lost_a_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_a_peer(ValueError("Connection closed by peer, said the user's own text"))


class _Terminal:
    """A text stream with a bytes buffer, as sys.stderr is."""

    def __init__(self):
        self.buffer = io.BytesIO()


def test_the_copy_keeps_progress_bars_and_stops_at_the_traceback(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_bytes(b"")
    terminal = _Terminal()
    copy = _Copy(terminal)
    pieces = [b"training:  1%|", b"\rtraining:  2%|\rtraining:  3%|", b" loss=0.2\n", b"\nipu-t5: this",
              b" rank's traceback (kept in its log; the launcher reports the failure):\nTraceback (most recent",
              b" call last):\nRuntimeError: Connection closed by peer\n"]
    for piece in pieces:
        with open(str(log), "ab") as f:
            f.write(piece)
        copy.pump(log, final=False)
    copy.pump(log, final=True)
    shown = terminal.buffer.getvalue()
    assert shown == b"training:  1%|\rtraining:  2%|\rtraining:  3%| loss=0.2\n\n"
    assert TRACEBACK_MARK.encode() in log.read_bytes()
    assert copy.last == b"\n"


def test_a_line_that_only_starts_like_the_mark_is_shown(tmp_path):
    log = tmp_path / "stdout.log"
    terminal = _Terminal()
    copy = _Copy(terminal)
    for piece in [b"step 1\n", b"ipu-t5: ", b"resuming from step-5\n", b"ipu-t5: stopped"]:
        with open(str(log), "ab") as f:
            f.write(piece)
        copy.pump(log, final=False)
    copy.pump(log, final=True)
    assert terminal.buffer.getvalue() == b"step 1\nipu-t5: resuming from step-5\nipu-t5: stopped"
    assert copy.last == b"d"


def test_console_echo_copies_local_rank_0_of_the_newest_attempt(tmp_path, monkeypatch):
    out, err = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logs = tmp_path / "logs"
    for attempt, text in ((0, b"old\n"), (1, b"summary\n")):
        for rank in ("0", "1"):
            directory = logs / "run_abc" / "attempt_{}".format(attempt) / rank
            directory.mkdir(parents=True)
            (directory / "stdout.log").write_bytes(text + rank.encode())
            (directory / "stderr.log").write_bytes(b"bar\r")
    assert attempt_dir(logs) == logs / "run_abc" / "attempt_1"
    echo = ConsoleEcho(logs, interval=0.01)
    with echo:
        pass
    assert out.buffer.getvalue() == b"summary\n0" and err.buffer.getvalue() == b"bar\r"
    assert echo.mid_line


def test_console_echo_follows_a_restart_into_the_new_attempt(tmp_path, monkeypatch):
    """torchrun restarted the workers (--max-restarts): the terminal gets the rest of the failed
    attempt's rank 0 up to its traceback, then the new attempt's from its start, on a new line."""
    out, err = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logs = tmp_path / "logs"
    first = logs / "run_abc" / "attempt_0" / "0"
    first.mkdir(parents=True)
    (first / "stdout.log").write_bytes(b"model: tiny\n")
    (first / "stderr.log").write_bytes(b"training:  40%|")
    echo = ConsoleEcho(logs)
    echo._pump(final=False)
    with open(str(first / "stderr.log"), "ab") as f:
        f.write(b"\n" + TRACEBACK_MARK.encode() + b"\nTraceback (most recent call last):\n")
    second = logs / "run_abc" / "attempt_1" / "0"
    second.mkdir(parents=True)
    (second / "stdout.log").write_bytes(b"ipu-t5: restart 1 after a failed process: continuing from step 4 (x)\n")
    (second / "stderr.log").write_bytes(b"training:  40%|")
    echo._pump(final=True)
    assert out.buffer.getvalue() == b"model: tiny\nipu-t5: restart 1 after a failed process: continuing from step 4 (x)\n"
    assert err.buffer.getvalue() == b"training:  40%|\ntraining:  40%|"
