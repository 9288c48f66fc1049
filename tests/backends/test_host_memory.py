"""The allocator settings the torch.distributed ranks make before they hold a weight (ipu_t5/backends/host_memory.py)."""
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

# A fresh process: 200 blocks of 1 MB after one such block came and went (which, by glibc's default,
# raises the mmap threshold above 1 MB), then all but the last freed; prints how much resident
# memory the frees gave back.
CHILD = """
import sys
import psutil
import torch
from ipu_t5.backends.host_memory import keep_heap_small
if sys.argv[1] == "keep":
    keep_heap_small()
process = psutil.Process()
warm = torch.ones(256 * 1024)
del warm
blocks = [torch.ones(256 * 1024) for _ in range(200)]
held = process.memory_info().rss
del blocks[:-1]
print(held - process.memory_info().rss)
"""


def _returned(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=str(ROOT), env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.core
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt; other C libraries are left as they are")
def test_freed_blocks_go_back_to_the_system_at_once():
    kept = _returned("keep")
    plain = _returned("plain")
    # 199 MB freed: all of it returned with the settings; by default the heap keeps it.
    assert kept > 180 * 2 ** 20, kept
    assert plain < kept - 100 * 2 ** 20, (plain, kept)
