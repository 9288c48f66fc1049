"""torch.distributed.checkpoint files written past the page cache (`checksum_file`), each one's
CRC-32 taken while it is written: the same bytes as torch's writer, a manifest that needs no
read-back."""
import os
import sys
from pathlib import Path

import pytest
import torch

from ipu_t5.checkpointing import atomic, dcp
from ipu_t5.checkpointing.format import SHARDED_DIR

try:
    from ipu_t5.checkpointing import direct_write
except ImportError:
    pytest.skip("torch {} has no torch.distributed.checkpoint FileSystem to extend: it saves with its own "
                "writer".format(torch.__version__), allow_module_level=True)

pytestmark = pytest.mark.core


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
