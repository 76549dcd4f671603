"""Faults for `rine batch` tests, importable by name on Ray workers (the tests put this folder
on the workers' PYTHONPATH): a decoder that dies on one file, an actor that is killed once, a
slow actor (so that a driver can be killed mid-job)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from rine.cluster.job import BatchConfig
from rine.cluster.tasks import Scorer, resolve

default_decode = resolve(BatchConfig.decode_fn)  # what rine batch decodes with unless told


def prepare_views_or_die(source, *args):
    """rine batch's default decode function, except that a file named `kills-worker.png` kills its decoding process
    (as a segfaulting decoder or the out-of-memory killer would) and one named `hangs.png`
    never finishes (a decoder stuck on a hostile file)."""
    if str(source).endswith("kills-worker.png"):
        os.kill(os.getpid(), signal.SIGKILL)
    if str(source).endswith("hangs.png"):
        time.sleep(3600)
    return default_decode(source, *args)


class ScorerKilledOnce(Scorer):
    """A Scorer whose process is killed (SIGKILL) in the middle of its second batch, once: the
    marker file `actor-killed` in RINE_TEST_KILL_DIR (set before the cluster started, so
    that workers inherit it) records that it happened."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        marker = Path(os.environ["RINE_TEST_KILL_DIR"]) / "actor-killed"
        if self.calls == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


class SlowScorer(Scorer):
    """A Scorer that takes RINE_TEST_SLOW seconds per batch."""

    def __call__(self, batch):
        time.sleep(float(os.environ.get("RINE_TEST_SLOW", "0.5")))
        return super().__call__(batch)
