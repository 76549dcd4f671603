"""Image files broken in ways the decoders report differently (for the tests of the one
error mapping, `rine.data.images.decode_errors`)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest


def corrupt_avif() -> bytes:
    """An AVIF file with a few bytes changed on which Pillow's decoder raises RuntimeError
    (skips where Pillow has no AVIF)."""
    from PIL import Image, features

    if not features.check("avif"):
        pytest.skip("Pillow without AVIF")
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="AVIF")
    good = out.getvalue()
    for seed in range(500):
        rnd, bad = random.Random(seed), bytearray(good)
        for _ in range(rnd.randint(1, 10)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        try:
            Image.open(io.BytesIO(bytes(bad))).load()
        except RuntimeError:
            return bytes(bad)
        except Exception:  # noqa: BLE001 - other failures are mapped already
            continue
    pytest.fail("no mutation of the AVIF file made Pillow raise RuntimeError")
