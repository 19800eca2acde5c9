"""Handing memory a run has freed back to the operating system between its phases.

glibc's allocator keeps freed blocks for reuse instead of returning them, so a phase that needs new memory (the
loss plot's matplotlib import at the end of a run) adds to the resident size the earlier phases left behind, and
the run's peak resident memory grows by it. `release_freed_memory` returns what is free now (on the short job it
takes the loss plot's ~22 MiB off the peak; BENCHMARKS.md "Whole job").
"""

from __future__ import annotations

import ctypes


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; other C libraries have no such call
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> None:
    """Ask the C allocator to return the memory it holds free (a no-op where the C library has no malloc_trim).
    Objects in reference cycles are not collected first: that full collection costs more than a second on a
    loaded CPU and, measured on the short job, frees nothing more."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
