"""Decoding workers: one function mapped over a stream of jobs by a pool of threads or
processes, results in input order, a bounded number of jobs in flight.

    for key, result, error in ordered_map(prepare_views, jobs, kind="processes", workers=8, max_in_flight=32):
        ...

`Detector.predict_iter` and the evaluation loop decode through this. A job that raises
comes back with its exception (`error`) and the stream goes on. A worker process that
dies (a segfault in an image decoder, the out-of-memory killer) breaks a whole
`ProcessPoolExecutor`; the jobs then in flight are re-run one at a time in a fresh worker to
find the one that killed it, which comes back as `DecoderCrashed`, and the stream goes on.

Worker processes die with the process that started them, however it ends (SIGKILL, the
out-of-memory killer): each watches a pipe whose only writer is that process and exits at
its end of file (on Linux, also a parent-death signal). Without this, forkserver workers
would live on -- each holds the forkserver's liveness pipe, and the forkserver and the
resource tracker with them -- and keep the caller's stdout/stderr open
(`rine detect ... | cat` would never end).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # this module stays importable without torch (the CLI reads DECODERS from it)
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DECODERS",
    "DEFAULT_DECODE_TIMEOUT",
    "DecoderCrashed",
    "DecoderTimedOut",
    "DecodeOptions",
    "decode_batches",
    "default_decoder",
    "default_workers",
    "error_kind",
    "error_text",
    "open_pool",
    "ordered_map",
]

DECODERS = ("auto", "threads", "processes")

K = TypeVar("K")


class DecoderCrashed(RuntimeError):
    """The worker process decoding this input died; the input was skipped."""

    def __init__(self, message: str = ""):
        super().__init__(
            message
            or "the decoding worker process died on this file (a crash in its image decoder, or the "
            "out-of-memory killer); it was skipped -- open it with another tool to check it"
        )


class DecoderTimedOut(DecoderCrashed):
    """Decoding this input took longer than the deadline; its worker process was stopped."""

    def __init__(self, seconds: float):
        super().__init__(
            f"decoding this file took longer than {seconds:g} s; its worker process was stopped and the file "
            "skipped (raise the limit with --decode-timeout)"
        )


DEFAULT_DECODE_TIMEOUT = 300.0  # seconds per image; a legitimate 8000 x 8000 PNG takes ~2 s


def error_text(error: BaseException, name: str = "") -> str:
    """A file's one-line error: ours (ImageLoadError, DecoderCrashed) speak for themselves,
    others are prefixed with their type (and their traceback goes to the debug log)."""
    from .images import ImageLoadError

    if isinstance(error, (ImageLoadError, DecoderCrashed)):
        return str(error)
    logger.debug("unexpected error on %s", name, exc_info=error)
    return f"{type(error).__name__}: {error}".splitlines()[0]


def error_kind(error: BaseException) -> str:
    """A file's error as a short stable token, for telling errors apart without reading their
    text: `ImageLoadError.KINDS` (missing, too_large, too_many_pixels, corrupt, ...),
    "timeout" and "crashed" for a decoding worker stopped or dead, else "error"."""
    from .images import ImageLoadError

    if isinstance(error, ImageLoadError):
        return error.kind
    if isinstance(error, DecoderTimedOut):
        return "timeout"
    return "crashed" if isinstance(error, DecoderCrashed) else "error"


def default_decoder(device: torch.device) -> str:
    """"processes" with a GPU (where the platform can fork from a server), "threads" on CPU.

    With a GPU, decoding is the bottleneck and 16+ threads contend for the GIL between
    Pillow's C calls (measured on an H100 host, 16 cores, ViT-B/32: 450 images/s with
    threads against 521 for a 16-process DataLoader); on a CPU the cores belong to the
    encoder and a few threads overlap decoding with it at no IPC cost."""
    if device.type == "cuda" and "forkserver" in multiprocessing.get_all_start_methods():
        return "processes"
    return "threads"


def default_workers(device: torch.device) -> int:
    """Decoding workers. On CPU they share the cores with the encoder (one per core, at
    most 8); with a GPU decoding is the bottleneck, so every core decodes (at most 32)."""
    cores = os.cpu_count() or 2
    return max(1, min(32 if device.type == "cuda" else 8, cores))


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded, as one object from the CLI (--max-pixels, --max-bytes,
    --workers, --decoder, --decode-timeout) down to the pools: the limits checked before an
    image is decoded, the pool kind and size, and the per-image timeout (processes only;
    None: no limit). `workers` None and `decoder` "auto" are chosen for the device."""

    max_pixels: int | None = None
    max_bytes: int | None = None
    workers: int | None = None
    decoder: str = "auto"
    timeout: float | None = DEFAULT_DECODE_TIMEOUT

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive (None: no limit)")

    def pool(self, device: torch.device) -> tuple[str, int]:
        """(pool kind, workers) for `device`: the defaults filled in."""
        kind = default_decoder(device) if self.decoder == "auto" else self.decoder
        return kind, self.workers or default_workers(device)


def decode_batches(
    fn: Callable[..., Any],
    jobs: Iterable[tuple[K, tuple]],
    options: DecodeOptions,
    *,
    batch_size: int,
    device: torch.device,
    preload: Sequence[str] = (),
) -> Iterator[list[tuple[K, Any, BaseException | None]]]:
    """`ordered_map` of `fn` over `jobs` with `options`' pool, grouped for an encoder: each
    list holds consecutive results in input order, and is yielded when it has `batch_size`
    decoded ones, or at once when it has only failures (nothing to wait for), and at the end.
    `Detector.predict_iter` and eval's live scoring both read their images through here."""
    kind, workers = options.pool(device)
    decoded = ordered_map(fn, jobs, kind=kind, workers=workers, max_in_flight=max(2 * batch_size, 2 * workers),
                          preload=preload, timeout=options.timeout)
    batch: list[tuple[K, Any, BaseException | None]] = []
    n_ok = 0
    try:
        for key, result, error in decoded:
            batch.append((key, result, error))
            n_ok += error is None
            if n_ok >= batch_size or not n_ok:
                yield batch
                batch, n_ok = [], 0
        if batch:
            yield batch
    finally:
        decoded.close()


def open_pool(kind: str, workers: int, preload: Sequence[str] = ()) -> Executor:
    """A pool of `workers` threads or processes ("threads" / "processes")."""
    if kind == "threads":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rine-decode")
    if kind != "processes":
        raise ValueError(f"decoder must be 'threads' or 'processes', got {kind!r}")
    # forkserver: workers fork from a clean server process (never from this one, which may
    # hold CUDA and OpenMP state); preloading the caller's module makes each fork cheap. The
    # server starts once per process: the first caller's preload list is the one kept.
    # Workers (forkserver or spawn, where there is no forkserver) re-import the main script:
    # scripts need `if __name__ == "__main__"`, else `ordered_map` falls back to threads.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("spawn")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(_liveness_reader(),))


# (pid, reader, writer) of this process's liveness pipe; the writer never leaves this
# process (pipes are not inherited, and only the reader is sent to workers), so the
# workers' readers see end of file exactly when this process is gone.
_LIVENESS: tuple[int, Any, Any] | None = None
_LIVENESS_LOCK = threading.Lock()
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _liveness_reader():
    """The read end of this process's liveness pipe (a multiprocessing Connection), made once per process."""
    global _LIVENESS
    with _LIVENESS_LOCK:
        if _LIVENESS is None or _LIVENESS[0] != os.getpid():
            reader, writer = multiprocessing.Pipe(duplex=False)
            _LIVENESS = (os.getpid(), reader, writer)
        return _LIVENESS[1]


def _init_worker(parent_alive: Any = None) -> None:
    """In a worker process. Ctrl-C reaches the whole process group: the parent handles it
    and kills the pool, so workers stay quiet instead of printing a traceback each. The
    worker dies with the process that opened the pool (`parent_alive`: the read end of
    its liveness pipe). And one thread per native pool (OpenCV, used by the
    perturbations): the workers are the parallelism."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_alive)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)


def _die_with_parent(parent_alive: Any) -> None:
    """Exit when the pool's owner is gone. Portable: a thread reading the owner's liveness
    pipe, which ends when the owner does, whatever killed it. Linux: also PR_SET_PDEATHSIG,
    SIGKILL when the worker's own parent (the forkserver) dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (static or unusual builds): the pipe still works
            pass
    if parent_alive is not None:
        threading.Thread(target=_exit_at_end_of, args=(parent_alive,), name="rine-parent-watch",
                         daemon=True).start()


def _exit_at_end_of(parent_alive: Any) -> None:
    try:
        while True:
            parent_alive.recv_bytes()  # nothing is ever sent: this returns only at end of file
    except (EOFError, OSError):
        pass
    os._exit(70)  # the owner is gone: no one is left to take this worker's results


def _settled(result: Any = None, error: BaseException | None = None) -> Future:
    fut: Future = Future()
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)
    return fut


def _lost(fut: Future | None) -> bool:
    """Whether a job's future was lost with a broken pool (or never reached it)."""
    if fut is None or fut.cancelled() or not fut.done():
        return True
    return isinstance(fut.exception(), BrokenExecutor)


class _OrderedPool:
    """The state of one `ordered_map`: the pool and the jobs in flight, oldest first."""

    # Lost jobs in a row that kill a lone worker before the decoder itself is blamed
    # (workers that cannot run the function at all) rather than the files.
    SUSPECT_AFTER = 3

    def __init__(self, fn: Callable[..., Any], kind: str, workers: int, preload: Sequence[str],
                 timeout: float | None = None):
        self.fn, self.kind, self.workers, self.preload = fn, kind, workers, preload
        self.timeout = timeout if kind == "processes" else None  # a thread cannot be stopped
        self.pool = open_pool(kind, workers, preload)
        # [key, args, future]; future None: the pool was already broken at submission
        self.pending: deque[list] = deque()

    def submit(self, key: Any, args: tuple) -> None:
        try:
            fut: Future | None = self.pool.submit(self.fn, *args)
        except BrokenExecutor:
            fut = None
        self.pending.append([key, args, fut])

    def pop(self) -> tuple[Any, Any, BaseException | None]:
        oldest = self.pending[0][2]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while oldest is not None and not oldest.done():
            # Poll rather than block: a future that a dying pool fails to settle must not hang us.
            step = 2.0 if deadline is None else min(2.0, max(0.0, deadline - time.monotonic()))
            if wait([oldest], timeout=step).done or self._broken():
                break
            if deadline is not None and time.monotonic() >= deadline:
                logger.warning("decoding %s took longer than %g s: stopping its worker process", self.pending[0][0],
                               self.timeout)
                _terminate_workers(self.pool)  # the other jobs in flight are re-run by _recover
                self.pending[0][2] = _settled(error=DecoderTimedOut(self.timeout))
                break
        if _lost(self.pending[0][2]):
            self._recover()
        key, _, fut = self.pending.popleft()
        try:
            return key, fut.result(), None
        except Exception as e:  # noqa: BLE001 - the job's error is its outcome
            return key, None, e

    def _broken(self) -> bool:
        try:
            self.pool.submit(_noop)
        except BrokenExecutor:
            return True
        return False

    def _recover(self) -> None:
        """The pool is broken: settle every job it lost by re-running it alone, then reopen it."""
        self.pool.shutdown(wait=True)
        lost = [job for job in self.pending if _lost(job[2])]
        logger.warning("a decoding worker process died; re-running the %d job(s) in flight one at a time", len(lost))
        if not self._workers_run(_noop):
            return self._fall_back_to_threads(lost, "cannot start")
        probe = open_pool(self.kind, 1, self.preload)
        succeeded = crashed = 0
        try:
            for job in lost:
                try:
                    job[2] = _settled(probe.submit(self.fn, *job[1]).result(timeout=self.timeout))
                    succeeded += 1
                except FutureTimeout:
                    logger.warning("decoding %s took longer than %g s; skipped", job[0], self.timeout)
                    job[2] = _settled(error=DecoderTimedOut(self.timeout))
                    _terminate_workers(probe)
                    probe.shutdown(wait=True)
                    probe = open_pool(self.kind, 1, self.preload)
                except BrokenExecutor:
                    crashed += 1
                    if not succeeded and crashed >= self.SUSPECT_AFTER:
                        return self._fall_back_to_threads(lost, "die on every job")
                    logger.warning("decoding %s killed its worker process; skipped", job[0])
                    job[2] = _settled(error=DecoderCrashed())
                    probe.shutdown(wait=True)
                    probe = open_pool(self.kind, 1, self.preload)
                except Exception as e:  # noqa: BLE001 - the job's own error is its outcome
                    job[2] = _settled(error=e)
                    succeeded += 1
        finally:
            probe.shutdown(wait=True)
        self.pool = open_pool(self.kind, self.workers, self.preload)

    def _workers_run(self, fn: Callable[[], Any]) -> bool:
        """Whether a fresh worker process can start and run `fn`."""
        probe = open_pool(self.kind, 1, self.preload)
        try:
            probe.submit(fn).result()
            return True
        except BrokenExecutor:
            return False
        finally:
            probe.shutdown(wait=True)

    def _fall_back_to_threads(self, lost: list[list], what: str) -> None:
        # Typically a script without `if __name__ == "__main__":` -- every worker process
        # re-imports the main script and fails -- or a function workers cannot import.
        logger.warning(
            "decoding worker processes %s; decoding in threads instead. From a script, put the code that "
            "calls rine under `if __name__ == \"__main__\":` (worker processes re-import the main script), "
            "or pass decode=DecodeOptions(decoder=\"threads\")", what,
        )
        self.kind, self.timeout = "threads", None
        self.pool = open_pool("threads", self.workers)
        for job in lost:
            job[2] = self.pool.submit(self.fn, *job[1])

    def close(self) -> None:
        """Stop now: queued jobs are cancelled and worker processes killed, not waited for
        (a stuck decode must not keep Ctrl-C from ending the program)."""
        for _, _, fut in self.pending:
            if fut is not None:
                fut.cancel()
        if self.pending and isinstance(self.pool, ProcessPoolExecutor):
            _terminate_workers(self.pool)
        self.pool.shutdown(wait=not self.pending, cancel_futures=True)


def _noop() -> None:
    return None


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def ordered_map(
    fn: Callable[..., Any],
    jobs: Iterable[tuple[K, tuple]],
    *,
    kind: str,
    workers: int,
    max_in_flight: int,
    preload: Sequence[str] = (),
    timeout: float | None = None,
) -> Iterator[tuple[K, Any, BaseException | None]]:
    """`fn(*args)` for each `(key, args)` of `jobs` in a pool of `workers` threads or processes
    (`kind`). Yields `(key, result, None)` or `(key, None, exception)` in input order.

    At most `max_in_flight` jobs are submitted ahead of the one being yielded, so an endless
    stream is read lazily and memory stays bounded. With processes, `fn`, its arguments
    and its result must pickle; `preload` names modules the worker server imports once;
    a job still running `timeout` seconds after it is waited for has its worker process
    stopped and comes back as `DecoderTimedOut` (threads cannot be stopped: no timeout).
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive (None: no limit)")
    state = _OrderedPool(fn, kind, workers, preload, timeout)
    try:
        for key, args in jobs:
            state.submit(key, args)
            while len(state.pending) >= max_in_flight:
                yield state.pop()
        while state.pending:
            yield state.pop()
    finally:
        state.close()
