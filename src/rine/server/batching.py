"""Cross-request batching: one encoder thread scores views gathered from many requests.

Requests hand in the uint8 views of one image each (`[V, S, S, 3]`, V = 1, or 10 for
ten-crop) and get a future. The worker takes what is queued, waits at most
`max_wait_s` for more while it would otherwise idle, and runs one encoder batch of at
most `max_batch` views. While the encoder is busy, new work piles up and forms the
next batch by itself, so under load the batch fills without any added wait.

The queue is bounded: `submit` raises `Overloaded` at once when it is full, which the
app turns into 503 + Retry-After instead of letting latency and memory grow.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# views uint8 [N, S, S, 3] -> (logits [N], block contribution [N, blocks])
ScoreFn = Callable[[np.ndarray], "tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]"]


class Overloaded(Exception):
    """The queue is full (or the batcher is closed): the caller should retry later."""


class ScoringFailed(Exception):
    """The encoder failed on this image (scored alone, after its batch failed)."""


@dataclass
class ViewScores:
    """The scores of one submitted image: logits [V], block contribution [V, blocks]."""

    logits: np.ndarray
    contributions: np.ndarray


# (views in the batch, seconds each of its images waited in the queue), from the encoder thread
BatchObserver = Callable[[int, "list[float]"], None]


@dataclass
class _Item:
    views: np.ndarray
    future: Future
    queued_at: float = 0.0  # time.monotonic() at submit
    # the submitter's context (its request id): the encoder's log lines about this image carry it
    context: contextvars.Context | None = None


def _fail(item: _Item, error: Exception) -> None:
    # The caller learns the failure's type only: its message may hold paths or tensor shapes.
    log = (item.context or contextvars.copy_context()).run
    log(logger.error, "encoder failed on an image", exc_info=error)
    item.future.set_exception(ScoringFailed(type(error).__name__))


class Batcher:
    """A bounded queue in front of one encoder worker thread."""

    def __init__(self, score_fn: ScoreFn, max_batch: int = 32, max_wait_s: float = 0.01, max_queue: int = 256,
                 on_batch: BatchObserver | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self.score_fn = score_fn
        self.on_batch = on_batch  # metrics: batch sizes and queue waits
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.images = 0
        self.views = 0
        self.largest_batch = 0
        self.rejected = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Batcher:
        with self._cond:
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="rine-encoder", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking work, let the worker finish the queue, then join it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        # Anything still queued (worker never started, or join timed out) must not hang its caller.
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        for item in leftover:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Overloaded("server is shutting down"))

    @property
    def depth(self) -> int:
        """Images waiting for the encoder."""
        return len(self._queue)

    def stats(self) -> dict[str, float | int]:
        return {
            "queued": self.depth,
            "batches": self.batches,
            "images": self.images,
            "mean_batch_views": round(self.views / self.batches, 2) if self.batches else 0.0,
            "largest_batch_views": self.largest_batch,
            "rejected": self.rejected,
        }

    # ------------------------------------------------------------------ producer side
    def submit(self, views: np.ndarray) -> Future:
        """Queue one image's views uint8 [V, S, S, 3]; the future gives `ViewScores`.

        Raises Overloaded when `max_queue` images are already waiting.
        """
        if views.ndim != 4 or views.dtype != np.uint8 or len(views) == 0:
            raise ValueError(f"expected uint8 views [V, S, S, 3], got {views.dtype} {tuple(views.shape)}")
        future: Future = Future()
        with self._cond:
            if self._closed or self._thread is None:
                raise Overloaded("the encoder is not running")
            if len(self._queue) >= self.max_queue:
                self.rejected += 1
                raise Overloaded(f"encoder queue full ({self.max_queue} images waiting)")
            self._queue.append(_Item(views, future, time.monotonic(), contextvars.copy_context()))
            self._cond.notify()
        return future

    # ------------------------------------------------------------------ worker side
    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            # Only an idle encoder waits for company; a busy one already let the queue fill.
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._queued_views() < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, n = [], 0
            while self._queue:
                v = len(self._queue[0].views)
                if batch and n + v > self.max_batch:
                    break
                batch.append(self._queue.popleft())
                n += v
            return batch

    def _score(self, batch: list[_Item]) -> tuple[np.ndarray, np.ndarray]:
        """-> logits float32 [views], block contribution float32 [views, blocks] of `batch`."""
        logits, contrib = self.score_fn(np.concatenate([item.views for item in batch]))
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        return logits, np.asarray(contrib, dtype=np.float32)

    def _score_alone(self, item: _Item) -> None:
        try:
            logits, contrib = self._score([item])
        except Exception as e:  # noqa: BLE001 - reported to this image's caller
            _fail(item, e)
            return
        self.batches += 1
        self.images += 1
        self.views += len(logits)
        self.largest_batch = max(self.largest_batch, len(logits))
        item.future.set_result(ViewScores(logits, contrib))

    def _queued_views(self) -> int:
        return sum(len(item.views) for item in self._queue)

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # A request that timed out cancelled its future: skip its work.
            batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            if self.on_batch is not None:
                now = time.monotonic()
                try:
                    self.on_batch(sum(len(item.views) for item in batch), [now - item.queued_at for item in batch])
                except Exception:  # noqa: BLE001 - a metrics hook must never stop the encoder
                    logger.exception("batch observer failed")
            try:
                logits, contrib = self._score(batch)
            except Exception as e:  # noqa: BLE001 - the error belongs to the callers, not to this thread
                if len(batch) == 1:
                    _fail(batch[0], e)
                    continue
                # One bad input (or a transient failure) must not fail every request in the
                # batch: score the images one by one, so that only the culprit gets the error.
                logger.warning("encoder batch of %d images failed (%s); scoring them one by one", len(batch), e)
                for item in batch:
                    self._score_alone(item)
                continue
            n_views = len(logits)
            self.batches += 1
            self.images += len(batch)
            self.views += n_views
            self.largest_batch = max(self.largest_batch, n_views)
            start = 0
            for item in batch:
                v = len(item.views)
                item.future.set_result(ViewScores(logits[start : start + v], contrib[start : start + v]))
                start += v
