"""Job functions and scripts for tests/test_archives.py. Worker processes import jobs by
module name, so they live in a module rather than in a test file."""

from __future__ import annotations

import os
import time


def pid_slowly(i: int) -> int:
    """The worker's pid, after a short sleep (the workers stay busy while the test looks)."""
    time.sleep(0.05)
    return os.getpid()
