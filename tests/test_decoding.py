"""`rine.data.decoding.ordered_map`: input order, per-job errors, bounded look-ahead, and a
worker process that dies mid-stream costing only the job that killed it."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from rine.data.decoding import DecodeOptions, DecoderCrashed, ordered_map
from rine.inference.detector import Detector

from conftest import write_image
from support.worker_jobs import double_or_fail

# Long enough for a worker to start and finish a 2x on a loaded 2-core machine (1 s was not),
# short against the hour that `double_or_hang` asks for.
HANG_TIMEOUT = 5.0


def _run(values, kind, workers=3, max_in_flight=4):
    jobs = ((f"job{i}", (v,)) for i, v in enumerate(values))
    return list(ordered_map(double_or_fail, jobs, kind=kind, workers=workers, max_in_flight=max_in_flight,
                            preload=("support.worker_jobs",)))


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_results_in_input_order_with_errors_per_job(kind):
    values = [5, 1, -2, 4, 0, 7, -1, 2, 8, 3]
    out = _run(values, kind)
    assert [k for k, _, _ in out] == [f"job{i}" for i in range(len(values))]
    for v, (_, result, error) in zip(values, out, strict=True):
        if v < 0:
            assert result is None and isinstance(error, ValueError) and str(error) == f"negative: {v}"
        else:
            assert error is None and result == 2 * v


def test_reads_an_endless_stream_lazily():
    pulled = []

    def jobs():
        for i in itertools.count():
            pulled.append(i)
            yield i, (i,)

    stream = ordered_map(double_or_fail, jobs(), kind="threads", workers=2, max_in_flight=5)
    first = [next(stream) for _ in range(3)]
    assert [r for _, r, _ in first] == [0, 2, 4]
    assert len(pulled) <= 3 + 5  # never more than max_in_flight ahead of what was yielded
    stream.close()


def test_a_worker_that_dies_costs_only_its_own_job():
    values = [1, 2, 13, 4, 5, 6, 13, 8, 9, 10, 11, 12]
    out = _run(values, "processes", workers=2, max_in_flight=4)
    assert [k for k, _, _ in out] == [f"job{i}" for i in range(len(values))]
    for v, (_, result, error) in zip(values, out, strict=True):
        if v == 13:
            assert result is None and isinstance(error, DecoderCrashed)
            assert "worker process died" in str(error)
        else:
            assert error is None and result == 2 * v


def test_rejects_an_unknown_pool_kind():
    with pytest.raises(ValueError, match="threads"):
        list(ordered_map(double_or_fail, [(0, (1,))], kind="fibers", workers=1, max_in_flight=1))


def test_detector_reports_the_file_that_killed_a_decoding_process(tiny_checkpoint_dir, tmp_path, monkeypatch):
    """End to end through `predict_iter`: the file whose decoding kills its worker process gets
    an error naming the crash; every other file is scored as with threads."""
    import rine.inference.detector

    from support.worker_jobs import prepare_views_or_die

    paths = [str(write_image(tmp_path / f"{i}.png", size=(240, 230), seed=i)) for i in range(5)]
    paths.insert(2, str(write_image(tmp_path / "kills-worker.png", seed=9)))
    det = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    expected = {p.path: p.prob_fake for p in det.predict(paths, decode=DecodeOptions(decoder="threads"))}
    monkeypatch.setattr(rine.inference.detector, "prepare_views", prepare_views_or_die)
    preds = det.predict(paths, decode=DecodeOptions(decoder="processes", workers=2), batch_size=2)
    assert [p.path for p in preds] == paths
    crashed = preds[2]
    assert crashed.prob_fake is None and "worker process died" in crashed.error
    for p in preds[:2] + preds[3:]:
        assert p.error is None and p.prob_fake == pytest.approx(expected[p.path], abs=1e-6)


def test_closing_early_kills_running_workers_at_once():
    """Ctrl-C (or a consumer that stops) must not wait for decodes in flight."""
    from support.worker_jobs import sleep_then

    jobs = [(0, (0.0,))] + [(i, (60.0,)) for i in range(1, 6)]
    stream = ordered_map(sleep_then, iter(jobs), kind="processes", workers=2, max_in_flight=4, preload=("support.worker_jobs",))
    assert next(stream) == (0, 0.0, None)
    t0 = time.monotonic()
    stream.close()  # jobs 1-3 are still sleeping for a minute
    assert time.monotonic() - t0 < 20  # a liveness bound, not a speed target


def test_workers_that_cannot_run_the_function_fall_back_to_threads(caplog):
    """When every job kills its worker (the function cannot work in worker processes at all),
    the files are not blamed: decoding goes on in threads, with a warning that says why."""
    from support.worker_jobs import double_unless_in_a_worker

    jobs = ((i, (i,)) for i in range(6))
    with caplog.at_level("WARNING", logger="rine.data.decoding"):
        out = list(ordered_map(double_unless_in_a_worker, jobs, kind="processes", workers=2, max_in_flight=4,
                               preload=("support.worker_jobs",)))
    assert [(k, r, e) for k, r, e in out] == [(i, 2 * i, None) for i in range(6)]
    assert "decoding in threads instead" in caplog.text and '__name__ == "__main__"' in caplog.text


def test_an_unguarded_script_still_runs_in_threads(tmp_path):
    """A script calling rine without `if __name__ == "__main__":` makes every worker process
    re-run it and fail; the map falls back to threads and says how to fix the script."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from rine.data.decoding import ordered_map\n"
        "out = ordered_map(abs, ((i, (-i,)) for i in range(5)), kind='processes', workers=2, max_in_flight=4)\n"
        "print('results', [r for _, r, _ in out])\n",
        encoding="utf-8",
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "results [0, 1, 2, 3, 4]" in done.stdout
    assert "decoding in threads instead" in done.stderr


def test_recovery_reruns_only_the_jobs_in_flight(tmp_path):
    """After a crash only the jobs the broken pool lost run again: each crash re-runs at most
    max_in_flight jobs, and every job that finished keeps its first result."""
    from support.worker_jobs import logged_double_or_fail

    log = tmp_path / "runs.txt"
    values = [1, 2, 13, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16]
    jobs = ((i, (str(log), v)) for i, v in enumerate(values))
    out = list(ordered_map(logged_double_or_fail, jobs, kind="processes", workers=2, max_in_flight=4,
                           preload=("support.worker_jobs",)))
    assert [r for _, r, _ in out] == [None if v == 13 else 2 * v for v in values]
    runs = [int(line) for line in log.read_text(encoding="ascii").split()]
    assert set(runs) == set(values)
    assert len(runs) <= len(values) + 4  # one crash: at most the 4 jobs in flight ran twice
    assert runs.count(13) == 2  # the killer: once in the pool, once alone


def test_a_decode_that_hangs_is_stopped_at_the_deadline():
    """With processes, a job still running after `timeout` s has its worker stopped and comes
    back as DecoderTimedOut; the other jobs in flight are re-run, the stream goes on."""
    from rine.data.decoding import DecoderTimedOut

    from support.worker_jobs import double_or_hang

    values = [1, 2, 7, 4, 5, 6, 8, 9]
    t0 = time.monotonic()
    out = list(ordered_map(double_or_hang, ((i, (v,)) for i, v in enumerate(values)), kind="processes", workers=2,
                           max_in_flight=4, preload=("support.worker_jobs",), timeout=HANG_TIMEOUT))
    assert time.monotonic() - t0 < 120  # liveness: not the hour the job asks for
    assert [k for k, _, _ in out] == list(range(len(values)))
    for v, (_, result, error) in zip(values, out, strict=True):
        if v == 7:
            assert result is None and isinstance(error, DecoderTimedOut) and "--decode-timeout" in str(error)
        else:
            assert error is None and result == 2 * v
    with pytest.raises(ValueError, match="timeout"):
        next(ordered_map(double_or_hang, [(0, (1,))], kind="processes", workers=1, max_in_flight=1, timeout=0))


def test_a_hang_found_while_recovering_from_a_crash_is_stopped_too():
    """A crash (13) with a hanging job (7) in flight: re-run alone, each gets its own error."""
    from rine.data.decoding import DecoderTimedOut

    from support.worker_jobs import double_or_hang

    values = [1, 13, 7, 4, 5, 6]
    out = list(ordered_map(double_or_hang, ((i, (v,)) for i, v in enumerate(values)), kind="processes", workers=2,
                           max_in_flight=4, preload=("support.worker_jobs",), timeout=HANG_TIMEOUT))
    errors = {v: type(e).__name__ for v, (_, _, e) in zip(values, out, strict=True) if e is not None}
    assert errors == {13: "DecoderCrashed", 7: "DecoderTimedOut"}
    assert [r for _, r, _ in out if r is not None] == [2, 8, 10, 12]
    assert issubclass(DecoderTimedOut, DecoderCrashed)
