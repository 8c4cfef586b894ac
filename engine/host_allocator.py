"""glibc malloc settings for running passes on the CPU.

A CPU pass allocates and frees many temporaries of 100 KB to a few MB (logit chunks, the batch's logits,
gathered prefixes). glibc serves blocks above its mmap threshold with mmap/munmap, so each pass pays
fresh page faults for them, and the threshold moves with the process's history: the same engine measured
19 ms per batch-8 pass of tiny-random in a fresh process and 25 ms after transformers' generate() had run
in it. Fixed thresholds keep such blocks in the heap for reuse: every pass then costs the same (19 ms in
both cases), at the price of keeping up to TRIM_THRESHOLD of freed memory mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("press.engine")

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap (32 MiB is glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap kept mapped before it is returned to the system.
TRIM_THRESHOLD = 256 << 20


def tune_host_allocator() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False (and nothing changed) on a libc
    without mallopt, such as musl or macOS's."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.warning("mallopt refused the allocator thresholds; keeping glibc's defaults")
    return ok
