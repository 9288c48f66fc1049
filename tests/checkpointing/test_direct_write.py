"""torch.distributed.checkpoint files written past the page cache, each one's CRC-32 taken while it
is written: the same bytes as torch's writer, a manifest that needs no read-back."""
import errno
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

from ipu_t5.checkpointing import atomic, dcp
from ipu_t5.checkpointing.format import SHARDED_DIR
from tests.checkpointing.test_page_cache import cached_fraction

try:
    from ipu_t5.checkpointing import direct_write
except ImportError:
    pytest.skip("torch {} has no torch.distributed.checkpoint FileSystem to extend: it saves with its own "
                "writer".format(torch.__version__), allow_module_level=True)

pytestmark = pytest.mark.core


def crc(data: bytes) -> str:
    return "{:08x}".format(zlib.crc32(data) & 0xFFFFFFFF)


def write_pieces(path, pieces):
    with direct_write.ChecksumFile(path) as f:
        for piece in pieces:
            assert f.write(piece) == memoryview(piece).nbytes
        assert f.tell() == sum(memoryview(p).nbytes for p in pieces)
    return f


@pytest.mark.parametrize("sizes", [[0], [5], [4096], [3, 9000, 1, 20000], [8192 * 3 + 17]])
def test_a_file_holds_exactly_what_was_written_across_buffers(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(direct_write, "BUFFER_BYTES", 8192)  # two O_DIRECT blocks: every boundary is crossed
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
    monkeypatch.setattr(direct_write, "BUFFER_BYTES", 8192)
    real_write, refused = os.write, []

    def write(fd, data):
        if f_holder and f_holder[0].direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    f_holder = []
    monkeypatch.setattr(direct_write.os, "write", write)
    data = os.urandom(20000)
    with direct_write.ChecksumFile(tmp_path / "f.bin") as f:
        f.direct = True  # as if the open had taken O_DIRECT
        f_holder.append(f)
        f.write(data)
    assert not f.direct and refused == [8192]
    assert (tmp_path / "f.bin").read_bytes() == data and f.length == len(data)

    def open_refusing_direct(path, flags, mode=0o777):
        if flags & direct_write.DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    real_open = os.open
    monkeypatch.setattr(direct_write.os, "open", open_refusing_direct)
    f_holder.clear()
    f = write_pieces(tmp_path / "g.bin", [data])
    assert not f.direct and (tmp_path / "g.bin").read_bytes() == data


def test_a_full_disk_raises_and_closes_the_file(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "write", full)
    closed = []
    real_close = os.close
    monkeypatch.setattr(direct_write.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(OSError) as caught:
        write_pieces(tmp_path / "f.bin", [b"x" * 10])
    assert atomic.is_no_space(caught.value) and len(closed) == 1


def state():
    generator = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(300, 301, generator=generator), "b": torch.randn(7, generator=generator)},
            "optimizer": {"step": torch.tensor(3.0), "m": torch.randn(1000, dtype=torch.float64, generator=generator)}}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_save_records_every_file_as_a_read_back_finds_it_and_loads_back(tmp_path):
    saved = state()
    recorded = dcp.transfer("save", saved, tmp_path / "ckpt")
    assert sorted(recorded) == sorted(p.name for p in (tmp_path / "ckpt").iterdir())  # .metadata included
    assert recorded == atomic.fsync_tree(tmp_path / "ckpt", checksum=True)
    loaded = {part: {k: torch.zeros_like(v) for k, v in tensors.items()} for part, tensors in saved.items()}
    dcp.transfer("load", loaded, tmp_path / "ckpt")
    for part, tensors in saved.items():
        for name, tensor in tensors.items():
            assert torch.equal(loaded[part][name], tensor), (part, name)
    # The bytes are torch's own writer's: both load alike, and hold the same tensors.
    torch_written = tmp_path / "torch"
    import torch.distributed.checkpoint as torch_dcp

    torch_dcp.save(saved, checkpoint_id=str(torch_written), no_dist=True)
    assert (torch_written / "__0_0.distcp").read_bytes() == (tmp_path / "ckpt" / "__0_0.distcp").read_bytes()


def test_the_manifest_reads_back_only_what_no_writer_recorded(tmp_path, monkeypatch):
    root = tmp_path / "staging"
    recorded = dcp.transfer("save", state(), root / SHARDED_DIR)
    (root / SHARDED_DIR / "extra.bin").write_bytes(b"not from the writer")
    read_back = []
    real = atomic.file_crc32

    def counted(f):
        read_back.append(Path(f.name).name)
        return real(f)

    monkeypatch.setattr(atomic, "file_crc32", counted)
    def gather(part):  # two processes: this one and a peer that recorded nothing
        return [part, {}] if part is recorded else [part, part]

    manifest = atomic.sharded_manifest(root, 0, 2, gather, recorded)
    assert read_back == ["extra.bin"]  # first in sorted order of the three: this process's share
    expected = atomic.fsync_tree(root / SHARDED_DIR, checksum=True)
    assert manifest == {"{}/{}".format(SHARDED_DIR, k): v for k, v in expected.items()}
    # Without records (a torch whose writer keeps none), every file is read back, shared as before.
    read_back.clear()
    calls = []
    atomic.sharded_manifest(root, 1, 2, lambda part: calls.append(part) or [{}, part])
    assert len(calls) == 1 and read_back == ["__0_0.distcp"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an fd's file name is read from Linux's /proc")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_every_file_is_synced_once_whole(tmp_path, monkeypatch):
    """Durable as torch's writer makes it: each file of a save is fsynced after its last byte is
    written, once."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append((os.readlink("/proc/self/fd/{}".format(fd)), os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dcp.transfer("save", state(), tmp_path / "ckpt")
    files = {str(p): p.stat().st_size for p in (tmp_path / "ckpt").iterdir()}
    # The metadata is synced under its temporary name, then renamed.
    renamed = {name.replace(".metadata.tmp", ".metadata"): size for name, size in synced}
    assert len(synced) == len(files) and renamed == files
