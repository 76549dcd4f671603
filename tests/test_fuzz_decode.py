"""Fuzzing the decode path: every input either scores (gives views) or is refused with
rine's own `ImageLoadError` and its kind, within a time and a memory bound per input.

Inputs are small valid JPEG, PNG, WebP, GIF, TIFF and BMP files, and files carrying the
metadata rine's provenance reader parses (PNG text chunks, XMP, a C2PA manifest), mutated by hypothesis:
bit flips, truncations, header fields rewritten (image sizes, with the PNG checksum fixed
so that the field reaches the decoder), chunks and segments reordered, bytes inserted.
Each input is decoded in a worker process of rine's own decoder pool, whose address
space is capped: a crash (a segfault in a C decoder), a hang or a memory blow-up is
caught there and reported with the input, instead of taking the test run down. The metadata
inputs also go through `rine.provenance.reader.read_provenance`, which must return a record
(bad pieces as signals with an error) rather than raise, crash or stall.

CI runs a short seeded pass (a few seconds). A release check runs a long one:

    RINE_FUZZ_EXAMPLES=20000 RINE_FUZZ_SEED=random python -m pytest tests/test_fuzz_decode.py -q

An input that fails is written to the folder named in the failure; once the bug is fixed,
keep it under tests/data/fuzz/ (a `.bin` file): `test_fuzz_regressions` replays each one.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tempfile
import zlib
from concurrent.futures import BrokenExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rine.data.decoding import _terminate_workers, open_pool  # noqa: E402

from support import archives_jobs, provenance_files  # noqa: E402

EXAMPLES = int(os.environ.get("RINE_FUZZ_EXAMPLES", "120"))
_SEED_TEXT = os.environ.get("RINE_FUZZ_SEED", "14")
SEED = random.SystemRandom().randrange(2**32) if _SEED_TEXT == "random" else int(_SEED_TEXT)
TIME_LIMIT_S = 30.0  # per input; a liveness bound (the machine may be loaded), not a speed target
MEMORY_LIMIT = 1 << 30  # bytes a worker may allocate above what it holds at start
MAX_PIXELS = 4_000_000  # the decoder's pixel limit in these runs: larger headers are refused unread
FINDINGS = Path(os.environ.get("RINE_FUZZ_FINDINGS", Path(tempfile.gettempdir()) / "rine-fuzz-findings"))
REGRESSIONS = Path(__file__).parent / "data" / "fuzz"


# ---------------------------------------------------------------------- seed files
def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    h, w = 20, 27  # odd sizes: padding and partial blocks/rows in every codec
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[:, :, 0] = np.arange(w, dtype=np.uint8)[None, :] * 9  # some structure for the compressors
    image = Image.fromarray(rgb, "RGB")
    out = {}
    for name, fmt, extra, img in [
        ("jpeg", "JPEG", {"quality": 80}, image),
        ("jpeg-progressive", "JPEG", {"quality": 70, "progressive": True}, image),
        ("png", "PNG", {}, image),
        ("png-palette", "PNG", {}, image.convert("P")),
        ("webp", "WEBP", {"quality": 60}, image),
        ("gif", "GIF", {}, image.convert("P")),
        ("tiff", "TIFF", {"compression": "tiff_lzw"}, image),
        ("bmp", "BMP", {}, image),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **extra)
        out[name] = buf.getvalue()
    return out


SEEDS = _seed_files()
META_SEEDS = provenance_files.metadata_seeds()


# ---------------------------------------------------------------------- mutations
def _png_chunks(data: bytes) -> list[bytes] | None:
    """The chunks of a PNG (length, type, data, crc each), or None if it does not parse."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            return None
        chunks.append(data[pos:end])
        pos = end
    return chunks


def _set_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the image size in the header of a PNG (checksum fixed), GIF, BMP or baseline JPEG."""
    b = bytearray(data)
    if data.startswith(b"\x89PNG"):
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif data.startswith(b"GIF"):
        b[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM"):
        b[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, (-height if height & 1 else height) & 0x7FFFFFFF)
    elif data.startswith(b"\xff\xd8"):
        sof = next((i for i in range(2, len(b) - 9) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2)), None)
        if sof is not None:
            b[sof + 5 : sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(b)


@st.composite
def mutated_inputs(draw, seeds: dict[str, bytes] = SEEDS) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(seeds)))
    data = seeds[name]
    steps = []
    # Mostly past the signature (12 bytes covers RIFF....WEBP): a broken signature is only
    # ever "not an image", and the decoders' code is behind it.
    start = 0 if draw(st.integers(0, 7)) == 0 else 12
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "header", "size", "reorder", "insert", "swap"]))
        n = len(data)
        lo = min(start, max(n - 1, 0))
        if op == "flip" and n:
            b = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                b[draw(st.integers(lo, n - 1))] ^= 1 << draw(st.integers(0, 7))
            data = bytes(b)
        elif op == "truncate" and n:
            data = data[: draw(st.integers(lo, n - 1))]
        elif op == "header" and n:  # a header field: one of the first 64 bytes
            pos = draw(st.integers(lo, max(lo, min(63, n - 1))))
            value = draw(st.binary(min_size=1, max_size=4))
            data = data[:pos] + value + data[pos + len(value) :]
        elif op == "size":
            w = draw(st.sampled_from([0, 1, 2, 255, 256, 4096, 65535, 1 << 20, (1 << 31) - 1]))
            h = draw(st.sampled_from([0, 1, 3, 255, 4096, 65535, 1 << 20]))
            data = _set_size(data, w, h)
        elif op == "reorder":
            chunks = _png_chunks(data)
            if chunks and len(chunks) > 1:
                order = draw(st.permutations(range(len(chunks))))
                data = data[:8] + b"".join(chunks[i] for i in order)
            elif n > 12:  # other formats: move a segment elsewhere
                i, j = sorted(draw(st.lists(st.integers(lo, n), min_size=2, max_size=2)))
                data = data[:i] + data[j:] + data[i:j]
        elif op == "insert":
            pos = draw(st.integers(lo, n))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos:]
        elif op == "swap" and n > lo + 1:
            i, j = sorted(draw(st.lists(st.integers(lo, n - 1), min_size=2, max_size=2, unique=True)))
            b = bytearray(data)
            b[i], b[j] = b[j], b[i]
            data = bytes(b)
        steps.append(op)
    return f"{name}: {' '.join(steps)}", data


# ---------------------------------------------------------------------- the property
class _Decoder:
    """One crash-isolating worker process (rine's own pool), replaced when a case kills or stalls it."""

    def __init__(self):
        self.pool = open_pool("processes", 1)

    def check(self, data: bytes, label: str) -> tuple[str, object]:
        """("views", shape) or ("refused", kind); fails the test (keeping the input) otherwise."""
        future = self.pool.submit(archives_jobs.fuzz_decode, data, MAX_PIXELS, MEMORY_LIMIT)
        try:
            outcome = future.result(timeout=TIME_LIMIT_S)
        except FutureTimeout:
            self._restart()
            self._fail(data, label, f"took longer than {TIME_LIMIT_S:g} s")
        except BrokenExecutor:
            self._restart()
            self._fail(data, label, "crashed its decoding worker process")
        except Exception as e:  # noqa: BLE001 - anything but ImageLoadError is the finding
            self._fail(data, label, f"raised {type(e).__name__}: {e}"[:300])
        kind, detail = outcome
        assert kind == "views" and detail == (1, 224, 224, 3) or kind == "refused", (label, outcome)
        return outcome

    def check_provenance(self, data: bytes, label: str) -> tuple[int, int]:
        """(signals, errors) of the provenance record; fails the test (keeping the input) otherwise."""
        future = self.pool.submit(provenance_files.fuzz_provenance, data, MEMORY_LIMIT)
        try:
            return future.result(timeout=TIME_LIMIT_S)
        except FutureTimeout:
            self._restart()
            self._fail(data, label, f"provenance took longer than {TIME_LIMIT_S:g} s")
        except BrokenExecutor:
            self._restart()
            self._fail(data, label, "provenance crashed its worker process")
        except Exception as e:  # noqa: BLE001 - the reader must never raise on file content
            self._fail(data, label, f"provenance raised {type(e).__name__}: {e}"[:300])

    def _restart(self) -> None:
        _terminate_workers(self.pool)
        self.pool.shutdown(wait=True)
        self.pool = open_pool("processes", 1)

    @staticmethod
    def _fail(data: bytes, label: str, what: str) -> None:
        FINDINGS.mkdir(parents=True, exist_ok=True)
        path = FINDINGS / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
        path.write_bytes(data)
        pytest.fail(f"{label}: {what}; input kept in {path} (fix, then move it to tests/data/fuzz/)")

    def close(self) -> None:
        _terminate_workers(self.pool)
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def decoder():
    d = _Decoder()
    yield d
    d.close()


def test_every_seed_file_scores(decoder):
    """The fuzzer's starting points are valid: a mutation that is refused is the mutation's doing."""
    for name, data in SEEDS.items():
        assert decoder.check(data, name)[0] == "views", name


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@hypothesis.seed(SEED)
@given(case=mutated_inputs())
def test_mutated_images_score_or_are_refused_with_a_kind(decoder, case):
    label, data = case
    decoder.check(data, f"seed {SEED}, {label}")


def test_every_metadata_seed_declares_something(decoder):
    for name, data in META_SEEDS.items():
        assert decoder.check(data, name)[0] == "views", name
        n_signals, n_errors = decoder.check_provenance(data, name)
        assert n_signals >= 1 and n_errors == 0, name


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@hypothesis.seed(SEED)
@given(case=mutated_inputs(META_SEEDS))
def test_mutated_metadata_is_read_or_reported(decoder, case):
    label, data = case
    decoder.check_provenance(data, f"seed {SEED}, {label}")
    decoder.check(data, f"seed {SEED}, {label}")  # and the file still scores or is refused


def test_fuzz_regressions(decoder):
    """Inputs that once crashed, hung or escaped as a foreign exception (kept after the fix)."""
    paths = sorted(REGRESSIONS.glob("*.bin"))
    if not paths:
        pytest.skip(f"no regression input in {REGRESSIONS} yet (see its README.md)")
    for path in paths:
        decoder.check(path.read_bytes(), path.name)
        decoder.check_provenance(path.read_bytes(), path.name)
