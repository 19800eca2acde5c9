"""memory.release_freed_memory: memory a phase freed goes back to the operating system before the next phase."""

from pathlib import Path

import pytest

from dreambooth_fast.memory import _malloc_trim, release_freed_memory


def resident_mib() -> int:
    return next(int(line.split()[1]) // 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


@pytest.mark.skipif(_malloc_trim() is None or not Path("/proc/self/status").exists(),
                    reason="needs glibc's malloc_trim and /proc")
def test_freed_heap_memory_is_returned_to_the_os():
    blocks, keep = [], []
    for _ in range(2000):  # 125 MiB in heap blocks, each followed by a live one: freed, they are holes in the heap
        blocks.append(bytearray(64 * 1024))
        keep.append(bytearray(1024))
    filled = resident_mib()
    del blocks
    kept_by_the_allocator = resident_mib()
    release_freed_memory()
    assert kept_by_the_allocator > filled - 30  # what the allocator keeps without the call
    assert resident_mib() < kept_by_the_allocator - 100
    assert len(keep) == 2000

