"""What writing checkpoints leaves in the system's page cache: a superseded checkpoint's pages are
dropped just before the next one is written, so the new pages reuse that memory; no file changes."""
import ctypes
import ctypes.util
import mmap
import os
import sys
import zlib

import pytest

from ipu_t5 import checkpointing
from ipu_t5.checkpointing import atomic
from ipu_t5.checkpointing.format import MODEL_FILE
from tests.checkpointing.test_checkpoint import train, weights

pytestmark = pytest.mark.core


def cached_fraction(path) -> float:
    """The fraction of `path`'s pages in the page cache: mincore(2) on a read-only mapping of it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(str(path))
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(str(path), os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            resident = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, resident) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in resident) / pages


def written_file(path, megabytes):
    data = os.urandom(1 << 20) * megabytes
    with open(str(path), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def require_a_page_cache_that_drops(directory):
    """Skip unless files written under `directory` sit in the page cache and the kernel drops
    their pages on request: not so on tmpfs, whose pages are the files themselves."""
    probe = directory / "probe.bin"
    written_file(probe, 1)
    before = cached_fraction(probe)
    fd = os.open(str(probe), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    after = cached_fraction(probe)
    probe.unlink()
    if before < 0.5 or after > 0.0:
        pytest.skip("the filesystem under {} keeps no droppable page cache (cached {:.0%} after writing, {:.0%} "
                    "after POSIX_FADV_DONTNEED: tmpfs keeps files in memory)".format(directory, before, after))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise are Linux's here")
def test_dropping_a_written_files_pages_keeps_the_file(tmp_path):
    require_a_page_cache_that_drops(tmp_path)
    files = [tmp_path / "a" / "one.bin", tmp_path / "a" / "sub" / "two.bin", tmp_path / "a" / "three.bin"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
    data = [written_file(f, 4) for f in files]
    atomic.drop_cached(tmp_path / "a", share=(1, 3))  # the second of three processes: one file of three
    fractions = [cached_fraction(f) for f in files]
    ordered = sorted(files, key=lambda f: str(f.relative_to(tmp_path / "a")))
    mine = ordered[1]
    assert fractions[files.index(mine)] == 0.0
    assert all(fraction > 0.5 for f, fraction in zip(files, fractions) if f != mine)
    atomic.drop_cached(tmp_path / "a")
    assert [cached_fraction(f) for f in files] == [0.0, 0.0, 0.0]
    assert [f.read_bytes() for f in files] == data
    atomic.drop_cached(tmp_path / "missing")  # nothing there: nothing to do


def test_checksums_of_files_longer_than_one_read(tmp_path):
    path = tmp_path / "long.bin"
    data = os.urandom(atomic.CHUNK + 12345)
    path.write_bytes(data)
    with open(str(path), "rb") as f:
        assert atomic.file_crc32(f) == "{:08x}".format(zlib.crc32(data) & 0xFFFFFFFF)
    path.write_bytes(b"")
    with open(str(path), "rb") as f:
        assert atomic.file_crc32(f) == "00000000"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise are Linux's here")
def test_the_next_checkpoint_drops_the_previous_ones_pages(tmp_path, monkeypatch):
    require_a_page_cache_that_drops(tmp_path)
    dropped = []
    real = atomic.drop_cached

    def record(root, share=(0, 1)):
        dropped.append((root.name, share, sorted(p.name for p in root.iterdir())))
        real(root, share)

    monkeypatch.setattr(atomic, "drop_cached", record)
    out = tmp_path / "run"
    train(out, **{"training.max_steps": 4, "output.save_steps": 2, "output.save_total_limit": 2})
    # Step 2's write found nothing before it; step 4's dropped step 2's pages (complete, in place).
    assert [(name, share) for name, share, _ in dropped] == [("step-2", (0, 1))]
    assert "trainer_state.json" in dropped[0][2]
    step2 = checkpointing.step_path(out, 2)
    assert cached_fraction(step2 / MODEL_FILE) == 0.0
    assert weights(step2)  # still whole: it reads back as before
