"""The host's memory allocator: keep freed memory for the next tensor instead of handing it back to the OS.

glibc's ``malloc`` serves large blocks with fresh ``mmap`` pages, unmaps them when they are freed and trims the top
of its heap. A training step on the CPU frees and allocates its large activations and gradients every step, so every
step faults in fresh pages that the kernel zeroes first: on 2 CPU threads that was a quarter to a third of a small
net's training time, and it made timings swing by 2x with the allocator's moving threshold. The command-line tools
call :func:`keep_freed_memory` at start; call it yourself in your own CPU training scripts.
"""

from __future__ import annotations

import ctypes
import platform

from continuum.files import KEEP_FREED_MEMORY, env_switch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse: blocks up to 1 GiB come from the heap (32 MiB on glibc
    versions that allow no more) and the heap is never trimmed, so the process keeps its peak memory.

    Does nothing where the C library is not glibc, or when ``$CONTINUUM_KEEP_FREED_MEMORY`` is off (``0``; see
    :func:`~continuum.files.env_switch`).

    Returns:
        Whether the allocator's settings were changed.

    Raises:
        ValueError: ``$CONTINUUM_KEEP_FREED_MEMORY`` says neither on nor off.
    """
    if not env_switch(KEEP_FREED_MEMORY) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's C library
    except (OSError, AttributeError):
        return False
    mapped_above = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped_above and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
