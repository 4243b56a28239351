"""Host memory for CPU training: freed blocks kept for reuse instead of handed back to the OS every step.

A CPU training step allocates and frees the same large buffers each time: the logits (tokens x vocabulary,
46 MB at 8 x 256 tokens and 5,632 ids), their gradient, the loss's intermediates. glibc's malloc
serves a block over its mmap threshold (at most 32 MB) with fresh pages from the OS and unmaps it when freed,
so every step touches those pages anew, one page fault per 4 KiB: about 22,000 faults per step of the
`demo` preset at that size, measured, and HF's default step about 45,000. `keep_freed_memory` turns that
off (`M_MMAP_MAX` 0: large blocks come from the heap too; `M_TRIM_THRESHOLD` 1 GiB: the heap's free top is
not trimmed back each step), so later steps reuse the first steps' pages: no faults, the same math. The
cost: the process keeps its peak heap (which a training loop reaches every step anyway), and it applies to
the whole process.

glibc only (Linux); elsewhere, or where mallopt refuses, it changes nothing and says so.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> tuple[bool, str]:
    """Apply the setting to this process: (applied, why), for the log."""
    lib, _ = platform.libc_ver()
    if platform.system() != "Linux" or lib != "glibc":
        return False, f"not glibc ({platform.system()}, {lib or 'unknown libc'}): the allocator is left as it is"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return False, f"mallopt is not available ({e})"
    if not ok:
        return False, "mallopt refused the setting"
    return True, "large blocks come from the heap and stay there when freed (no page faults each step)"
