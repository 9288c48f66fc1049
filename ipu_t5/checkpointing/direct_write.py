"""A storage writer for torch.distributed.checkpoint that writes past the page cache (O_DIRECT) and
takes each file's CRC-32 as it writes it.

torch's own FileSystemWriter writes through the page cache, and the manifest then reads every file
back for its CRC-32 (why that costs: `checksum_file`). This writer's files are `ChecksumFile`s,
past the page cache and checksummed as they are written. What it writes is byte for byte what
FileSystemWriter writes.
"""
import io
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Union

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from .checksum_file import ChecksumFile


class _ChecksumFileSystem(FileSystem):
    """torch's local FileSystem whose new files are `ChecksumFile`s, their sizes and CRC-32s kept
    by file name (a rename carries its entry along)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.written: Dict[str, Dict[str, object]] = {}

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = ChecksumFile(path)
        try:
            yield stream
        finally:
            stream.close()
        with self._lock:
            self.written[Path(path).name] = stream.entry

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path).name in self.written:
                self.written[Path(new_path).name] = self.written.pop(Path(path).name)


class ChecksumWriter(FileSystemWriter):
    """FileSystemWriter (one file per process) whose files are written by `ChecksumFile`; after
    the save, `written` maps each file this process wrote (its name in the checkpoint directory)
    to {"bytes", "crc32"}, as `atomic.fsync_tree` describes a file."""

    def __init__(self, path: Union[str, Path]) -> None:
        # Every file is synced once, by its own close, after its last block: torch's fsync
        # (sync_files) comes before the close writes that block, and would sync each file twice.
        super().__init__(str(path), single_file_per_rank=True, sync_files=False)
        self.fs = _ChecksumFileSystem()

    @property
    def written(self) -> Dict[str, Dict[str, object]]:
        return dict(self.fs.written)
