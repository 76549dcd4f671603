"""Hostile metadata never crashes or stalls the provenance reader: each bad piece becomes a
signal with an error, within the size caps and a time bound, and declares nothing. A reader
that inflates without a cap, parses XMP with entities, recurses without a limit or lets a
c2pa error escape fails here."""

from __future__ import annotations

import time
import zlib

import pytest

from rine.provenance.reader import read_provenance
from rine.provenance.types import ProvenanceLimits

from support import provenance_files as pf

TIME_BOUND_S = 5.0  # a liveness bound on a loaded 2-core machine; each case takes milliseconds alone


@pytest.fixture(scope="module")
def image():
    return pf.texture(64, seed=9)


def _read(data: bytes, **limits):
    start = time.monotonic()
    p = read_provenance(data, limits=ProvenanceLimits(**limits))
    assert time.monotonic() - start < TIME_BOUND_S
    return p


def _errors(p) -> list[str]:
    return [f"{s.where}: {s.error}" for s in p.signals if s.error]


def test_png_text_bomb(image):
    bomb = zlib.compress(b"A" * (200 * 1024 * 1024), 9)  # 200 MB of text in ~200 KB
    data = pf.insert_png_chunks(pf.encode(image, "PNG"), [
        pf.png_chunk(b"zTXt", b"parameters\x00\x00" + bomb),
        pf.png_chunk(b"iTXt", b"prompt\x00\x01\x00\x00\x00" + bomb),
    ])
    p = _read(data)
    errors = _errors(p)
    assert len(errors) == 2 and all("compression bomb" in e for e in errors), errors
    assert p.digital_source_type is None


def test_total_text_cap(image):
    chunks = [pf.png_chunk(b"tEXt", f"k{i}".encode() + b"\x00" + b"x" * 600_000) for i in range(20)]
    p = _read(pf.insert_png_chunks(pf.encode(image, "PNG"), chunks))
    assert any("per-file cap" in e for e in _errors(p))


def test_invalid_utf8_and_corrupt_zlib(image):
    data = pf.insert_png_chunks(pf.encode(image, "PNG"), [
        pf.png_chunk(b"iTXt", b"parameters\x00\x00\x00\x00\x00Steps: 20, Sampler: \xff\xfe Euler"),
        pf.png_chunk(b"zTXt", b"workflow\x00\x00not zlib at all"),
        pf.png_chunk(b"tEXt", b"no keyword separator"),
    ])
    p = _read(data)
    errors = _errors(p)
    assert any("png:parameters" in e and "invalid UTF-8" in e for e in errors), errors
    assert any("png:workflow" in e and "corrupt compressed text" in e for e in errors), errors
    assert p.digital_source_type is None  # a generator's key that cannot be read declares nothing


def test_comfy_prompt_not_json(image):
    p = _read(pf.png_with_text(image, [("tEXt", "prompt", "{'3': {'class_type': KSampler"),
                                       ("tEXt", "workflow", "[" * 100_000)]))
    errors = _errors(p)
    assert len(errors) == 2 and all("not JSON" in e for e in errors), errors
    assert p.digital_source_type is None and p.generator == "ComfyUI"


@pytest.mark.parametrize("case", ["huge", "deep", "entities", "external", "malformed", "wide"])
def test_hostile_xmp(image, case):
    wrap = '<x:xmpmeta xmlns:x="adobe:ns:meta/">{}</x:xmpmeta>'
    xmp, words = {
        "huge": (pf.xmp_packet() + " " * (2 * 1024 * 1024), "cap"),
        "deep": (wrap.format("<a>" * 100_000 + "</a>" * 100_000), "nested deeper"),
        "entities": ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
                     + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi", strict=True))
                     + ']><x:xmpmeta xmlns:x="adobe:ns:meta/">&i;</x:xmpmeta>', "refused"),
        "external": ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                     '<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;</x:xmpmeta>', "refused"),
        "malformed": ("<x:xmpmeta><rdf:RDF", "not well-formed"),
        "wide": (wrap.format("<a/>" * 50_000), "elements"),
    }[case]
    for data in (pf.jpeg_with_xmp(image, xmp) if len(xmp) < 65_000 else None, pf.png_with_xmp(image, xmp)):
        if data is None:
            continue
        p = _read(data)
        errors = _errors(p)
        assert len(errors) == 1 and words in errors[0], errors
        assert p.digital_source_type is None


@pytest.fixture(scope="module")
def signed():
    ca = pf.make_authority()
    return pf.sign(pf.encode(pf.texture(64, 1), "JPEG", quality=90), "image/jpeg", ca, "trainedAlgorithmicMedia")


def _app11(data: bytes) -> tuple[int, int]:
    start = data.index(b"\xff\xeb")
    return start, start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")


def test_corrupt_jumbf(signed):
    start, end = _app11(signed)
    for offset in (12, 40, (start + end) // 2 - start):  # box headers, the claim, the middle
        bad = bytearray(signed)
        bad[start + offset : start + offset + 24] = b"\xff" * 24
        p = _read(bytes(bad))
        (c2pa,) = [s for s in p.signals if s.kind == "c2pa"]
        assert p.verified is False and (c2pa.error or c2pa.validation_state == "Invalid"), c2pa


def test_truncated_jumbf(signed):
    start, end = _app11(signed)
    for cut in (start + 10, (start + end) // 2, end - 4):
        p = _read(signed[:cut])
        assert p.verified is False
        assert any("truncated" in e or "unreadable C2PA" in e for e in _errors(p)), _errors(p)


def test_truncated_and_looping_containers(image):
    png = pf.png_with_text(image, [("tEXt", "parameters", pf.A1111_PARAMETERS)])
    p = _read(png[:60])
    assert any("truncated" in e for e in _errors(p))
    many = pf.insert_png_chunks(pf.encode(image, "PNG"), [pf.png_chunk(b"teSt", b"")] * 5000)
    assert any("more than" in e for e in _errors(_read(many)))


def test_time_budget_skips_the_rest(image):
    p = _read(pf.png_with_xmp(image, pf.xmp_packet()), time_budget_s=-1.0)
    assert any("time budget" in e for e in _errors(p)) and p.digital_source_type is None


def test_file_over_cap_is_not_read(image):
    p = _read(pf.png_with_xmp(image, pf.xmp_packet()), max_file_bytes=100)
    assert p.signals == [] and "over the 100-byte cap" in p.reason


def test_corrupt_and_oversized_exif(image):
    png = pf.encode(image, "PNG")
    corrupt = pf.insert_png_chunks(png, [pf.png_chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40)])
    big = pf.insert_png_chunks(png, [pf.png_chunk(b"eXIf", b"II*\x00" + bytes(2 << 20))])
    for data, words in ((corrupt, "corrupt EXIF"), (big, "over the")):
        errors = _errors(_read(data))
        assert len(errors) == 1 and words in errors[0], errors


def test_exif_damage_is_read_from_many_threads_without_leaving_warnings_changed(image):
    """Pillow reports some EXIF damage only as a warning, caught with warnings.catch_warnings,
    which swaps process-wide state: threads inside it at once restore it out of order, and a
    recorder left installed swallows every later warning of the process (detect reads
    provenance ahead in a thread, the server in a pool)."""
    import threading
    import warnings

    damaged = pf.insert_png_chunks(pf.encode(image, "PNG"), [pf.png_chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x05" + b"\x01" * 40)])
    before = (warnings.showwarning, list(warnings.filters))
    found, start = [], threading.Barrier(6)

    def work():
        start.wait()
        found.extend(any("corrupt EXIF" in e for e in _errors(_read(damaged))) for _ in range(150))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (warnings.showwarning, list(warnings.filters)) == before
    assert len(found) == 900 and all(found)  # every read saw the damage (no warning lost to another thread)
