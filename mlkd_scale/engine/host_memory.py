"""Host memory on CPU ranks: keep what one training step frees for the next instead of returning it to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc's gives large freed blocks back to the
kernel (``munmap`` of blocks above its mmap threshold, trimming of the heap's free top) and maps them
again on the next allocation, and the kernel hands every 4 KiB page of that memory over with a page
fault and zeroes it when it is first written. A training step frees and re-allocates the same
activations every time, so a CPU rank took thousands of such faults per step: 9,000-11,000 in the
BERT-base → 4-layer step of ``benchmarks/objective_overhead.py``, at about 1.9 µs each on the machine
of docs/performance.md (≈ 19 ms, 0.7 % of that 2.7 s step), and up to 5,600 in the Stage-1 objective
alone, depending on the heap's state.
PyTorch's performance tuning guide recommends jemalloc or TCMalloc on CPUs for their reuse of memory;
without one, three glibc settings make ``malloc`` cache instead (``mallopt(3)``):

* ``M_MMAP_THRESHOLD`` = 32 MiB (older glibc versions refuse more: half their 64 MiB heap size): blocks
  below it come from the heap, whose memory is reused, and the threshold no longer moves with what
  was freed;
* ``M_TRIM_THRESHOLD`` = 2 GiB − 1: the free top of the heap is kept up to that size;
* ``M_TOP_PAD`` = 64 MiB: the heap grows in larger steps, so growth is rarer.

The rank's resident memory then stays at its peak, as under any caching allocator. Nothing is changed
where the user chose the allocator already: a ``MALLOC_*_`` variable or ``GLIBC_TUNABLES`` with
``glibc.malloc`` in the environment, or jemalloc/tcmalloc/mimalloc in ``LD_PRELOAD``; nor on a C library
without ``mallopt`` (musl, macOS). GPU memory has its own caching allocator and is not concerned.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: What :func:`keep_freed_memory` sets, by parameter.
SETTINGS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20}

USER_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                          "MALLOC_ARENA_MAX")
_CACHING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator_chosen_by_user(environ: dict[str, str] | None = None) -> str | None:
    """The environment setting by which the user chose or tuned the allocator, or None."""
    environ = os.environ if environ is None else environ
    for name in USER_MALLOC_VARIABLES:
        if name in environ:
            return name
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(name in environ.get("LD_PRELOAD", "") for name in _CACHING_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (module docstring); True if it was set."""
    if platform.libc_ver()[0] != "glibc" or allocator_chosen_by_user():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
