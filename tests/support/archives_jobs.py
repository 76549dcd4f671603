"""Job functions and scripts for tests/test_archives.py. Worker processes import jobs by
module name, so they live in a module rather than in a test file."""

from __future__ import annotations

import os
import time


def pid_slowly(i: int) -> int:
    """The worker's pid, after a short sleep (the workers stay busy while the test looks)."""
    time.sleep(0.05)
    return os.getpid()


_MEMORY_LIMITED = False


def _limit_memory(extra_bytes: int) -> None:
    """Cap this worker's address space at what it uses now plus `extra_bytes` (once): an
    input that makes the decoder allocate more fails with MemoryError instead of taking
    the machine."""
    global _MEMORY_LIMITED
    if _MEMORY_LIMITED:
        return
    import resource

    with open("/proc/self/statm") as f:  # Linux; elsewhere the cap is skipped
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, resource.RLIM_INFINITY))
    _MEMORY_LIMITED = True


def fuzz_decode(data: bytes, max_pixels: int, extra_memory: int) -> tuple[str, object]:
    """Decode `data` as `rine detect` does and cut its views. ("views", shape) or
    ("refused", kind) for rine's own ImageLoadError; anything else propagates (a finding)."""
    try:
        _limit_memory(extra_memory)
    except OSError:
        pass
    from rine.config import PreprocessConfig
    from rine.data.images import ImageLoadError
    from rine.inference.detector import prepare_views

    try:
        views = prepare_views(data, PreprocessConfig(), max_pixels)
    except ImageLoadError as e:
        return "refused", e.kind
    return "views", tuple(views.shape)
