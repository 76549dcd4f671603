"""`rine.decoding.ordered_map`: input order, per-job errors, bounded look-ahead, and a
worker process that dies mid-stream costing only the job that killed it."""

from __future__ import annotations

import itertools

import pytest

from rine.decoding import DecoderCrashed, ordered_map
from rine.inference import Detector
from worker_jobs import double_or_fail

from conftest import write_image


def _run(values, kind, workers=3, max_in_flight=4):
    jobs = ((f"job{i}", (v,)) for i, v in enumerate(values))
    return list(ordered_map(double_or_fail, jobs, kind=kind, workers=workers, max_in_flight=max_in_flight,
                            preload=("worker_jobs",)))  # fmt: skip


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
    import rine.inference
    from worker_jobs import prepare_views_or_die

    paths = [str(write_image(tmp_path / f"{i}.png", size=(240, 230), seed=i)) for i in range(5)]
    paths.insert(2, str(write_image(tmp_path / "kills-worker.png", seed=9)))
    det = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    expected = {p.path: p.prob_fake for p in det.predict(paths, decoder="threads")}
    monkeypatch.setattr(rine.inference, "prepare_views", prepare_views_or_die)
    preds = det.predict(paths, decoder="processes", num_workers=2, batch_size=2)
    assert [p.path for p in preds] == paths
    crashed = preds[2]
    assert crashed.prob_fake is None and "worker process died" in crashed.error
    for p in preds[:2] + preds[3:]:
        assert p.error is None and p.prob_fake == pytest.approx(expected[p.path], abs=1e-6)
