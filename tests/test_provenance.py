"""rine.provenance on files built here (tests/provenance_files.py): C2PA signed under a
throwaway CA, generator PNG chunks, XMP, EXIF. Each case checks `digital_source_type`,
`verified` and the reason, so a reader that trusts an unknown signer, ignores a broken hash,
misses a container or invents a declaration fails here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from rine.provenance.decision import combine
from rine.provenance.reader import read_provenance
from rine.provenance.types import FLAT_FIELDS, TrustConfig

from support import provenance_files as pf

pytest.importorskip("c2pa")


@pytest.fixture(scope="module")
def ca():
    return pf.make_authority("Rine Trusted Root")


@pytest.fixture(scope="module")
def other_ca():
    return pf.make_authority("Unlisted Root")


@pytest.fixture(scope="module")
def trust(ca):
    return TrustConfig(ca.root_pem.decode(), source="trusted.pem")


@pytest.fixture(scope="module")
def image():
    return pf.texture(288, seed=3)


@pytest.fixture(scope="module")
def signed_jpeg(ca, image):
    return pf.sign(pf.encode(image, "JPEG", quality=90), "image/jpeg", ca, "trainedAlgorithmicMedia",
                   generator="ImageMaker/2.1")


def test_signed_by_trusted_ca_is_verified(signed_jpeg, trust):
    p = read_provenance(signed_jpeg, trust=trust)
    assert (p.digital_source_type, p.verified, p.basis) == ("trainedAlgorithmicMedia", True, "c2pa:active-manifest")
    (c2pa,) = [s for s in p.signals if s.kind == "c2pa"]
    assert c2pa.validation_state == "Trusted" and c2pa.failed_codes == []
    assert "Rine Trusted Root Signer" in c2pa.signer and c2pa.claim_generator == "ImageMaker 2.1"
    assert c2pa.actions == [{"action": "c2pa.created", "digitalSourceType": "trainedAlgorithmicMedia"}]
    assert p.reason.startswith("verified") and "trusted.pem" in p.reason
    assert combine(p, "real")["decision"] == "synthetic"  # a verified claim decides over the detector


def test_unlisted_ca_and_no_anchors_are_not_verified(signed_jpeg, other_ca):
    for trust, words in [(TrustConfig(other_ca.root_pem.decode(), "other.pem"), "not in your trust list"),
                         (None, "no trust anchors configured")]:
        p = read_provenance(signed_jpeg, trust=trust)
        assert p.digital_source_type == "trainedAlgorithmicMedia" and p.verified is False
        assert "signed by Rine Trusted Root Signer" in p.reason and words in p.reason
        (c2pa,) = [s for s in p.signals if s.kind == "c2pa"]
        assert c2pa.validation_state == "Valid" and c2pa.failed_codes == ["signingCredential.untrusted"]
        d = combine(p, "real")
        assert d["decision"] == "real" and "unverified declaration" in d["basis"]  # shown, not overriding


def test_altered_after_signing_is_not_verified(signed_jpeg, trust):
    # the last scan bytes changed: the manifest is intact, the data hash is not
    altered = signed_jpeg[:-300] + bytes(b ^ 0x55 for b in signed_jpeg[-300:-10]) + signed_jpeg[-10:]
    p = read_provenance(altered, trust=trust)
    (c2pa,) = [s for s in p.signals if s.kind == "c2pa"]
    assert p.verified is False and c2pa.validation_state == "Invalid"
    assert "assertion.dataHash.mismatch" in c2pa.failed_codes
    assert "changed after signing" in p.reason
    assert combine(p, "real")["decision"] == "real"


def test_camera_capture(ca, trust, image):
    jpeg = pf.encode(image, "JPEG", quality=92)
    p = read_provenance(pf.sign(jpeg, "image/jpeg", ca, "digitalCapture", generator="Camera/1.0"), trust=trust)
    assert (p.digital_source_type, p.verified) == ("digitalCapture", True)
    d = combine(p, "synthetic")
    assert (d["decision"], d["declared"]) == ("real", "digitalCapture")
    assert d["basis"].startswith("verified C2PA declaration: digitalCapture")
    # a capture later edited with a generative tool is composite, and not "real"
    edited = pf.sign(jpeg, "image/jpeg", ca, "digitalCapture", actions=[
        {"action": "c2pa.created", "digitalSourceType": pf.IPTC + "digitalCapture"},
        {"action": "c2pa.edited", "digitalSourceType": pf.IPTC + "compositeWithTrainedAlgorithmicMedia"}])
    q = read_provenance(edited, trust=trust)
    assert q.digital_source_type == "compositeWithTrainedAlgorithmicMedia" and q.verified
    assert combine(q, "real")["decision"] == "synthetic"


def test_signed_png(ca, trust, image):
    p = read_provenance(pf.sign(pf.encode(image, "PNG"), "image/png", ca, "trainedAlgorithmicMedia"), trust=trust)
    assert (p.digital_source_type, p.verified) == ("trainedAlgorithmicMedia", True)


@pytest.mark.parametrize("name", ["a1111", "comfyui", "xmp-jpeg", "xmp-png", "xmp-webp", "exif-a1111", "fooocus", "novelai"])
def test_declarations_are_generated_and_unverified(name, image, trust):
    data, basis, generator = {
        "a1111": (pf.png_with_text(image, [("tEXt", "parameters", pf.A1111_PARAMETERS)]),
                  "png:parameters", "AUTOMATIC1111 Stable Diffusion WebUI"),
        "comfyui": (pf.png_with_text(image, [("tEXt", "prompt", pf.COMFY_PROMPT), ("zTXt", "workflow", '{"nodes": []}')]),
                    "png:prompt", "ComfyUI"),
        "xmp-jpeg": (pf.jpeg_with_xmp(image, pf.xmp_packet()), "xmp:Iptc4xmpExt:DigitalSourceType@jpeg:APP1", None),
        "xmp-png": (pf.png_with_xmp(image, pf.xmp_packet()), "xmp:Iptc4xmpExt:DigitalSourceType@png:iTXt:XML:com.adobe.xmp", None),
        "xmp-webp": (pf.encode(image, "WEBP", xmp=pf.xmp_packet().encode()), "xmp:Iptc4xmpExt:DigitalSourceType@webp:XMP", None),
        "exif-a1111": (_jpeg_with_user_comment(image, pf.A1111_PARAMETERS), "exif:UserComment",
                       "AUTOMATIC1111 Stable Diffusion WebUI"),
        "fooocus": (pf.png_with_text(image, [("tEXt", "parameters", json.dumps({"Prompt": "a cat", "Seed": 7})),
                                             ("tEXt", "fooocus_scheme", "fooocus")]), "png:parameters", "Fooocus"),
        "novelai": (pf.png_with_text(image, [("tEXt", "Software", "NovelAI"),
                                             ("tEXt", "Comment", json.dumps({"steps": 28, "seed": 1}))]),
                    "png:Software", "NovelAI"),
    }[name]
    p = read_provenance(data, trust=trust)
    assert (p.digital_source_type, p.verified, p.basis) == ("trainedAlgorithmicMedia", False, basis)
    assert "unverified" in p.reason
    if generator:
        assert p.generator == generator
    d = combine(p, "real")
    assert d["decision"] == "real" and d["declared"] == "trainedAlgorithmicMedia"


def test_generator_parameters_are_parsed(image):
    p = read_provenance(pf.png_with_text(image, [("iTXt", "parameters", pf.A1111_PARAMETERS)]))
    params = p.signals[0].parameters
    assert params["prompt"] == "a lighthouse at dusk, oil painting" and params["negative_prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["Seed"], params["Model"]) == ("20", "DPM++ 2M Karras", "1234", "sd_xl_base_1.0")
    comfy = read_provenance(pf.png_with_text(image, [("tEXt", "prompt", pf.COMFY_PROMPT)])).signals[0]
    assert comfy.parameters["ckpt_name"] == "sd_xl_base_1.0.safetensors" and comfy.parameters["seed"] == "5"


def test_xmp_capture_term_and_unknown_term(image):
    p = read_provenance(pf.jpeg_with_xmp(image, pf.xmp_packet("digitalCapture")))
    assert (p.digital_source_type, p.verified) == ("digitalCapture", False)
    assert combine(p, "synthetic")["decision"] == "synthetic"  # unverified capture claims never override
    bad = read_provenance(pf.jpeg_with_xmp(image, pf.xmp_packet("<script>").replace("<script>", "a b/c d")))
    assert bad.digital_source_type is None


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_plain_file_declares_nothing(image, fmt):
    p = read_provenance(pf.encode(image, fmt))
    assert (p.digital_source_type, p.verified, p.basis, p.signals) == (None, False, None, [])
    assert "absence proves nothing" in p.reason
    assert combine(p, "synthetic") == {"decision": "synthetic", "basis": "detector", "declared": None}


def test_precedence_signed_claim_over_png_text(ca, trust, image):
    # a trusted capture claim signed into a PNG that also carries A1111 text: the verified claim decides
    png = pf.png_with_text(image, [("tEXt", "parameters", pf.A1111_PARAMETERS)])
    p = read_provenance(pf.sign(png, "image/png", ca, "digitalCapture"), trust=trust)
    assert (p.digital_source_type, p.basis) == ("digitalCapture", "c2pa:active-manifest")
    assert {s.where for s in p.signals} >= {"c2pa:active-manifest", "png:parameters"}
    # without anchors the untrusted-but-valid manifest still outranks the PNG text
    assert read_provenance(pf.sign(png, "image/png", ca, "digitalCapture")).basis == "c2pa:active-manifest"


def test_records_round_trip(signed_jpeg, trust):
    p = read_provenance(signed_jpeg, trust=trust)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["signals"][0]["signer"] == p.signer and d["verified"] is True
    flat = p.flat()
    assert tuple(flat) == FLAT_FIELDS and flat["provenance_signals"] == "c2pa:c2pa:active-manifest"
    assert all(isinstance(v, str | bool) for v in flat.values())


def test_trust_config_from_file(tmp_path, ca, monkeypatch):
    pem = tmp_path / "anchors.pem"
    pem.write_bytes(ca.root_pem)
    assert TrustConfig.from_file(pem).configured
    monkeypatch.setenv("RINE_TRUST_ANCHORS", str(pem))
    assert TrustConfig.resolve(None).source == str(pem)
    (tmp_path / "bad.pem").write_text("hello")
    with pytest.raises(ValueError, match="bad.pem holds no PEM certificate"):
        TrustConfig.from_file(tmp_path / "bad.pem")


def _jpeg_with_user_comment(image: np.ndarray, text: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = "Some Editor 1.0"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_records_keep_the_detector_fields(signed_jpeg, trust, image):
    from rine.provenance.records import flat_columns, with_provenance
    from rine.provenance.types import CSV_FIELDS

    detector = {"path": "x.jpg", "prob_fake": 0.31, "logit": -0.8, "is_fake": False, "error": None}
    p = read_provenance(signed_jpeg, trust=trust)
    out = with_provenance(detector, p)
    assert {k: out[k] for k in detector} == detector  # unchanged
    assert out["decision"]["decision"] == "synthetic" and out["provenance"]["verified"] is True
    plain = with_provenance({**detector, "verdict": "uncertain"}, read_provenance(pf.encode(image, "PNG")))
    assert plain["decision"] == {"decision": "uncertain", "basis": "detector", "declared": None}
    failed = flat_columns({"path": "y", "error": "not an image"}, None)
    assert tuple(failed) == CSV_FIELDS and failed["decision"] == "" and failed["decision_basis"].startswith("none")


def test_threads_read_the_same(signed_jpeg, trust, other_ca):
    from concurrent.futures import ThreadPoolExecutor

    other = TrustConfig(other_ca.root_pem.decode(), "other.pem")
    jobs = [trust, other, None] * 6
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: read_provenance(signed_jpeg, trust=t).verified, jobs))
    assert got == [True, False, False] * 6


def test_catalogue_entries_cite_sources_and_match(image):
    from rine.provenance import catalogue

    for entry in (*catalogue.PNG_TEXT, *catalogue.SOFTWARE, *catalogue.WATERMARKS):
        assert entry.source and "/" in entry.source, entry
    # every PNG text entry is reachable: a file built to its description gets its generator
    for sig in catalogue.PNG_TEXT:
        value = json.dumps({"x": 1, "sui_image_params": {}}) if sig.json else f"a cat, {sig.contains or ''} Steps: 1"
        if sig.contains and sig.json:
            value = json.dumps({sig.contains: {}})
        marker = sig.marker.partition("=") if sig.marker else None
        chunks = [("tEXt", sig.key, value)] + ([("tEXt", marker[0], marker[2] or "x")] if marker else [])
        p = read_provenance(pf.png_with_text(image, chunks))
        got = next(s for s in p.signals if s.where == f"png:{sig.key}")
        assert got.generator == sig.generator and got.source_type == "trainedAlgorithmicMedia", sig


def test_unknown_text_is_shown_but_declares_nothing(image):
    p = read_provenance(pf.png_with_text(image, [("tEXt", "Title", "holiday"), ("tEXt", "parametersX", "Steps: 3"),
                                                 ("tEXt", "Software", "GIMP 2.10"), ("tEXt", "Comment", '{"a": 1}')]))
    assert [s.where for s in p.signals] == ["png:Title", "png:parametersX", "png:Software", "png:Comment"]
    assert p.digital_source_type is None and all(s.generator is None for s in p.signals)


@pytest.mark.parametrize("form", ["element", "resource"])
def test_xmp_property_forms(image, form):
    term = pf.IPTC + "compositeWithTrainedAlgorithmicMedia"
    prop = (f"<Iptc4xmpExt:DigitalSourceType>{term}</Iptc4xmpExt:DigitalSourceType>" if form == "element"
            else f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{term}"/>')
    xmp = pf.xmp_packet(None).replace('xmlns:xmp="http://ns.adobe.com/xap/1.0/"/>',
                                      f'xmlns:xmp="http://ns.adobe.com/xap/1.0/">{prop}</rdf:Description>')
    assert read_provenance(pf.png_with_xmp(image, xmp)).digital_source_type == "compositeWithTrainedAlgorithmicMedia"
