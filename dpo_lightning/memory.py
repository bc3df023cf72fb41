"""The CPU allocator's settings for training, set once per run before the first large allocation (by the
entrypoint's run for every strategy but FSDP, whose point is memory, and by evaluate.py).

glibc's malloc serves every block above 32 MB (its largest dynamic mmap threshold) with a fresh `mmap` and
hands it back with `munmap` on free, and trims the heap top back to the OS after a free. A training step
allocates and frees buffers of hundreds of MB (a vocabulary of 150k makes every logits chunk one), so each
step pays a page fault for every 4 KB page of each of them again: on CPU that was about half of a naive step's
time. `tune_cpu_allocator` keeps such blocks in the heap (no mmap) and the freed memory in the process (a
high trim threshold), so that the next step reuses pages already mapped.

`DPO_LIGHTNING_MALLOC=off` leaves glibc's defaults, for comparison; the glibc environment variables
(MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, ...) set by the user are respected and win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: keep up to 2 GB of free heap top before trimming
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def _glibc():
    """glibc's C library, or None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def release_free_memory() -> bool:
    """Hand the pages of freed heap memory back to the OS (glibc's `malloc_trim`): after a one-off phase that
    allocated and freed much (a reference pass), so that it does not stay in the process beside training's."""
    import gc

    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None and hasattr(libc, "malloc_trim") else False


def tune_cpu_allocator() -> bool:
    """Keep large blocks in glibc's heap and freed memory in the process; True when the settings took."""
    if os.environ.get("DPO_LIGHTNING_MALLOC", "").lower() in ("off", "0", "false", "no"):
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False  # the user tuned malloc themselves
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return done
