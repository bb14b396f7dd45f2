"""The engine process's C heap: freed blocks stay mapped for the next step instead of going back to the kernel.

A step phase allocates and frees the same few-megabyte tensors every 160 ms: the text head's logits (4.9 MB at 8
rows), the codec's spectra and overlap-add buffers (several MB for 8 windows). By default glibc serves blocks above
its mmap threshold (128 KiB, raised dynamically only up to the largest block freed so far) with fresh mappings and
trims free memory at the top of its heap, so each step takes page faults on memory the kernel zero-fills again:
measured at 1 thread, the codec decoding 8 windows of 36 frames took 31-41 ms that way, 19 ms with the settings
below (one window: ~3.5 ms either way). The engine's peak heap is its steady state (the same shapes every step),
so keeping it costs no more memory than its busiest step already needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from loguru import logger

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit on 64-bit: blocks below this come from the heap and are reused
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory kept at the heap's top before any is returned
TOP_PAD_BYTES = 64 << 20  # extra memory taken whenever the heap grows, so growth is rare
SETTINGS = (
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    (M_TOP_PAD, TOP_PAD_BYTES),
)


def keep_freed_memory() -> bool:
    """Sets the engine process's glibc heap to reuse freed blocks (see the module docstring); False where the C
    library is not glibc (musl, macOS), which is then left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    applied = all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
    if not applied:
        logger.warning(f"glibc {gnu_get_libc_version().decode()} refused the engine's heap settings; left as it is")
    return applied
