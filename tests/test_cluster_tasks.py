"""`rine batch`'s decoding-worker functions (rine.cluster.tasks), without Ray: a URI is fetched
once for provenance and decoding, with the same views, provenance and errors as a local path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rine.cluster import tasks
from rine.config import PreprocessConfig
from rine.data.images import ImageLoadError
from rine.provenance.types import TrustConfig

from support import provenance_files as pf

DECODE = "rine.data.jpeg_crop:decode_views"


@pytest.fixture
def fetches(monkeypatch):
    """The URIs `read_source` fetched (bytes passed through are not fetches)."""
    seen = []
    real = tasks.read_source

    def counting(source, max_bytes):
        if not isinstance(source, bytes) and tasks.is_uri(source):
            seen.append(source)
        return real(source, max_bytes)

    monkeypatch.setattr(tasks, "read_source", counting)
    return seen


def test_a_uri_is_fetched_once_for_provenance_and_decoding(tmp_path, fetches):
    """Object storage (s3://, gs://) costs a request and the transfer per read: before, the
    provenance read and the decoder each fetched the file."""
    path = tmp_path / "signed.png"
    path.write_bytes(pf.png_with_xmp(pf.texture(96, seed=3), pf.xmp_packet()))
    args = (DECODE, PreprocessConfig(), None, 1 << 20)
    views, provenance = tasks.with_provenance_of(tasks.score_views_of, (f"file://{path}", *args), TrustConfig())
    assert fetches == [f"file://{path}"]
    local_views, local_provenance = tasks.with_provenance_of(tasks.score_views_of, (str(path), *args), TrustConfig())
    assert np.array_equal(views, local_views) and views.shape[0] >= 1
    declared, local = json.loads(provenance), json.loads(local_provenance)
    assert declared["digital_source_type"] == "trainedAlgorithmicMedia" and declared == local


def test_a_uri_that_cannot_be_read_is_the_decoders_error_without_provenance(tmp_path, fetches):
    args = (DECODE, PreprocessConfig(), None, 1 << 20)
    error, provenance = tasks.with_provenance_of(tasks.score_views_of, (f"file://{tmp_path}/gone.png", *args),
                                                 TrustConfig())
    assert isinstance(error, ImageLoadError) and error.kind == "missing" and provenance is None
    big = tmp_path / "big.png"
    big.write_bytes(pf.encode(pf.texture(64), "PNG"))
    error, provenance = tasks.with_provenance_of(tasks.score_views_of, (f"file://{big}", DECODE, PreprocessConfig(),
                                                                        None, 100), TrustConfig())
    assert isinstance(error, ImageLoadError) and error.kind == "too_large" and provenance is None
    assert len(fetches) == 2  # one attempt each
