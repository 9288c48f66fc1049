"""A file written past the page cache, its CRC-32 taken while it is written (`checksum_file`): the
bytes as written across buffer boundaries, no page cache left behind, the fallbacks where O_DIRECT
is refused, and a full disk."""
import errno
import os
import sys
import zlib

import pytest
import torch

from ipu_t5.checkpointing import atomic, checksum_file
from tests.checkpointing.test_page_cache import cached_fraction

pytestmark = pytest.mark.core


def crc(data: bytes) -> str:
    return "{:08x}".format(zlib.crc32(data) & 0xFFFFFFFF)


def write_pieces(path, pieces):
    with checksum_file.ChecksumFile(path) as f:
        for piece in pieces:
            assert f.write(piece) == memoryview(piece).nbytes
        assert f.tell() == sum(memoryview(p).nbytes for p in pieces)
    return f


@pytest.mark.parametrize("sizes", [[0], [5], [4096], [3, 9000, 1, 20000], [8192 * 3 + 17]])
def test_a_file_holds_exactly_what_was_written_across_buffers(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(checksum_file, "BUFFER_BYTES", 8192)  # two O_DIRECT blocks: every boundary is crossed
    pieces = [os.urandom(n) for n in sizes]
    f = write_pieces(tmp_path / "f.bin", pieces)
    data = b"".join(pieces)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert (f.length, "{:08x}".format(f.crc32)) == (len(data), crc(data))
    # Views of other item sizes count in bytes, as torch's serializer hands them over.
    floats = torch.arange(3000, dtype=torch.float32)
    f = write_pieces(tmp_path / "g.bin", [memoryview(floats.numpy())])
    assert (tmp_path / "g.bin").read_bytes() == floats.numpy().tobytes() and f.length == 12000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and mincore are Linux's here")
def test_the_file_is_written_past_the_page_cache(tmp_path):
    try:  # probed here, not through the writer: a writer that stopped using O_DIRECT must fail, not skip
        os.close(os.open(str(tmp_path / "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as err:
        pytest.skip("the filesystem under {} refuses O_DIRECT ({}; tmpfs does): the writer goes through the page "
                    "cache there, as the fallback test checks".format(tmp_path, err.strerror))
    data = os.urandom(3 << 20) + b"tail"
    f = write_pieces(tmp_path / "f.bin", [data])
    assert f.direct
    assert cached_fraction(tmp_path / "f.bin") == 0.0
    assert (tmp_path / "f.bin").read_bytes() == data


def test_a_filesystem_that_refuses_direct_writes_gets_cached_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(checksum_file, "BUFFER_BYTES", 8192)
    real_write, refused = os.write, []

    def write(fd, data):
        if f_holder and f_holder[0].direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    f_holder = []
    monkeypatch.setattr(checksum_file.os, "write", write)
    data = os.urandom(20000)
    with checksum_file.ChecksumFile(tmp_path / "f.bin") as f:
        f.direct = True  # as if the open had taken O_DIRECT
        f_holder.append(f)
        f.write(data)
    assert not f.direct and refused == [8192]
    assert (tmp_path / "f.bin").read_bytes() == data and f.length == len(data)

    def open_refusing_direct(path, flags, mode=0o777):
        if flags & checksum_file.DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    real_open = os.open
    monkeypatch.setattr(checksum_file.os, "open", open_refusing_direct)
    f_holder.clear()
    f = write_pieces(tmp_path / "g.bin", [data])
    assert not f.direct and (tmp_path / "g.bin").read_bytes() == data


def test_a_full_disk_raises_and_closes_the_file(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checksum_file.os, "write", full)
    closed = []
    real_close = os.close
    monkeypatch.setattr(checksum_file.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(OSError) as caught:
        write_pieces(tmp_path / "f.bin", [b"x" * 10])
    assert atomic.is_no_space(caught.value) and len(closed) == 1


def test_a_one_process_checkpoint_is_written_through_it_and_read_back_by_nobody(tmp_path, monkeypatch):
    """The safetensors files of a one-process checkpoint: the library's own bytes, their manifest
    entries the writer's, not a read-back's."""
    import json
    from pathlib import Path

    from safetensors.torch import load, save

    from ipu_t5 import checkpointing
    from ipu_t5.checkpointing.format import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
    from tests.checkpointing.test_checkpoint import train

    read_back = []
    real = atomic.file_crc32
    monkeypatch.setattr(atomic, "file_crc32", lambda f: read_back.append(Path(f.name).name) or real(f))
    out = tmp_path / "run"
    train(out, **{"training.max_steps": 2, "output.save_steps": 2}).close()
    path = checkpointing.step_path(out, 2)
    assert "config.yaml" in read_back and not {MODEL_FILE, OPTIMIZER_FILE} & set(read_back)
    files = json.loads((path / STATE_FILE).read_text())["files"]
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        data = (path / name).read_bytes()
        assert files[name] == {"bytes": len(data), "crc32": crc(data)}
        assert data == save(load(data), metadata={"format": "pt"})
    checkpointing.inspect(path)
