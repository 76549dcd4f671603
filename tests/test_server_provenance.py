"""`/v1/detect` results carry what each upload declares (`provenance`) and the combined
`decision`; `--trust-anchors` verifies C2PA; the detector's fields are the same without."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("c2pa")
from fastapi.testclient import TestClient  # noqa: E402

from rine.provenance.types import TrustConfig  # noqa: E402
from rine.server.app import create_app  # noqa: E402
from rine.server.limits import ServerSettings  # noqa: E402

from support import provenance_files as pf  # noqa: E402


@pytest.fixture(scope="module")
def ca():
    return pf.make_authority()


def _post(detector, settings, files):
    with TestClient(create_app(detector, settings)) as c:
        r = c.post("/v1/detect", files=[("files", (n, d, "application/octet-stream")) for n, d in files])
        assert r.status_code == 200, r.text
        return r.json()["results"]


def test_results_carry_provenance_and_decision(tiny_detector, ca):
    img = pf.texture(240, 2)
    files = [("signed.jpg", pf.sign(pf.encode(img, "JPEG", quality=90), "image/jpeg", ca, "trainedAlgorithmicMedia")),
             ("a1111.png", pf.png_with_text(img, [("tEXt", "parameters", pf.A1111_PARAMETERS)])),
             ("plain.png", pf.encode(img, "PNG"))]
    trusted = _post(tiny_detector, ServerSettings(trust=TrustConfig(ca.root_pem.decode(), "t.pem")), files)
    bare = _post(tiny_detector, ServerSettings(trust=None), files)
    for t, b in zip(trusted, bare, strict=True):
        assert b.get("provenance") is None and b.get("decision") is None
        assert {k: t[k] for k in b if k not in ("provenance", "decision")} == {k: v for k, v in b.items()
                                                                                 if k not in ("provenance", "decision")}
    signed, a1111, plain = trusted
    assert signed["provenance"]["verified"] is True and signed["decision"]["decision"] == "synthetic"
    assert a1111["provenance"]["digital_source_type"] == "trainedAlgorithmicMedia"
    assert a1111["decision"]["decision"] == a1111["verdict"] and "unverified" in a1111["decision"]["basis"]
    assert plain["provenance"]["signals"] == [] and plain["decision"]["basis"] == "detector"
    untrusted = _post(tiny_detector, ServerSettings(), files[:1])[0]  # default: read, no anchors
    assert untrusted["provenance"]["verified"] is False and "not in your trust list" in untrusted["provenance"]["reason"]


def test_page_loads_the_provenance_view(tiny_detector):
    with TestClient(create_app(tiny_detector)) as c:
        page = c.get("/").text
        assert '<script src="/static/provenance.js" defer></script>' in page and 'class="provenance"' in page
        js = c.get("/static/provenance.js")
        assert js.status_code == 200 and "C2PA verification" not in js.text  # words, not a stub
        assert "checked only in the server mode" in js.text and "textContent" in js.text and "innerHTML" not in js.text
