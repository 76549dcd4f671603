"""Job functions for `rine.data.decoding` tests. They live in a module (not in a test file) so
that worker processes, which import them by name, can find them."""

from __future__ import annotations

import os
import signal
import time


def double_or_fail(x: int) -> int:
    """2x; raises for negatives; kills its own worker process for 13 (as a segfaulting
    decoder or the out-of-memory killer would)."""
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    if x < 0:
        raise ValueError(f"negative: {x}")
    time.sleep(0.002 * (x % 3))  # finish out of order
    return 2 * x


def prepare_views_or_die(source, *args):
    """`prepare_views`, except that a file named `kills-worker.png` kills the worker."""
    if str(source).endswith("kills-worker.png"):
        os.kill(os.getpid(), signal.SIGKILL)
    from rine.inference.detector import (
        prepare_views,  # here, so that the other tests' workers skip torch
    )

    return prepare_views(source, *args)


def sleep_then(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def double_unless_in_a_worker(x: int) -> int:
    """2x in the calling process; kills any worker process it runs in (a decoder that
    cannot work in workers at all)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * x


def logged_double_or_fail(log: str, x: int) -> int:
    """`double_or_fail`, appending x to the file `log` first (one line per run)."""
    with open(log, "a", encoding="ascii") as f:
        f.write(f"{x}\n")
    return double_or_fail(x)


def double_or_hang(x: int) -> int:
    """`double_or_fail`, except that 7 never finishes (a decoder stuck on a hostile file)."""
    if x == 7:
        time.sleep(3600)
    return double_or_fail(x)
