"""How much host memory a process keeps of what it frees: glibc's allocator told to hand large
blocks back at once, and freed heap returned to the system. Nothing happens on other C libraries."""
import ctypes
import ctypes.util
import gc
import os

# mallopt's parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks from this size up are mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 64 * 1024


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap_small() -> None:
    """Freed tensors go back to the system as they are freed. By default glibc raises its mmap
    threshold up to 32 MB as large blocks come and go, so a T5 block's weights, gradients and
    FSDP2's gathered copies land in the heap, and gives the communication threads heaps of their
    own; what is freed there still counts as the process's memory, and a step's transient blocks
    pile up in it. A fixed threshold and one heap keep the process at what it holds. A setting
    given in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX) is left as it is."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, 1)


def return_freed_memory() -> None:
    """Give the memory of freed tensors back to the system: what glibc keeps in its heaps below
    the mmap threshold still counts as the process's memory until `malloc_trim`."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
