"""Give freed memory back to the system at once (glibc), for the passes over chunks.

glibc's malloc serves a request below its mmap threshold from heaps it keeps after the block
is freed, and raises that threshold to the largest block freed so far (up to 32 MB). A pass
over chunks allocates and frees blocks of a few MB per thread on every iteration, so the
process's resident size keeps the high-water mark of all of them. With the threshold fixed at
64 kB (fixing it also turns the raise off) and the heap trimmed above 64 kB, those blocks are
mapped and unmapped instead. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` in the environment of
the worker processes it starts for the same reason (setting it also turns the raise off), so
this is for the process that runs the pipeline: with local threads, every pass runs there.

Measured: ``scripts/bench_scale.py --release-memory both`` (docs/large-data.md).
"""

from __future__ import annotations

import sys

#: Bytes: blocks at least this large are mapped (and unmapped at free); the heap is trimmed
#: when this much is free at its top.
THRESHOLD = 64 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds of this process to ``threshold`` bytes.

    Process-wide and kept after the run (glibc has no call that restores the dynamic
    threshold). Returns whether it applied: ``False`` off Linux or where the C library is
    not glibc (musl has no ``mallopt``), where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(threshold)) == 1

