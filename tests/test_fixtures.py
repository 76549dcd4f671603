"""The test fixtures are part of the repository: a clone with nothing beside it runs the suite.

Catches a fixture left out of the repository (or fetched from beside it again), and a
fixture changed by accident (the parity references are the reference code's outputs: a
re-encoded image or a re-saved head would silently move what the parity tests compare).
"""

from __future__ import annotations

import hashlib
import json
import re

from conftest import FIXTURES, OFFICIAL, PARITY, REPO


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fixtures_live_in_the_repository():
    assert FIXTURES.is_relative_to(REPO)
    for folder in (PARITY, OFFICIAL):
        assert folder.is_relative_to(REPO / "tests"), folder
        assert folder.is_dir(), f"{folder} is missing from the repository"


def test_parity_images_are_the_references_inputs():
    meta = json.loads((PARITY / "meta.json").read_text())
    on_disk = sorted(p.name for p in (PARITY / "images").iterdir())
    assert on_disk == sorted(name.split("/")[-1] for name in meta["image_sha256"])
    for name, digest in meta["image_sha256"].items():
        assert sha256(PARITY / "images" / name.split("/")[-1]) == digest, name
    for name in ("input", "ln2_cls", "ln2_all_tokens", "logits", "z", "clip_embed"):
        assert (PARITY / "tiny" / f"{name}.npy").stat().st_size > 0
    assert (PARITY / "README.md").exists()


def test_official_files_match_their_source_record():
    source = (OFFICIAL / "SOURCE.md").read_text()
    listed = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})\s+(\S+)$", source, re.M))
    assert set(listed) == {"model_2class_trainable.pth", "real_aadlygmazf.jpg", "fake_dalle_zzrybysskm.png"}
    assert "Apache License 2.0" in source
    for name, digest in listed.items():
        assert sha256(OFFICIAL / name) == digest, name


def test_no_test_reaches_outside_the_repository_for_fixtures():
    """A `../shared` or RINE_SHARED path in a test would make a bare clone fail or skip again."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")) + [REPO / "scripts" / "test.sh"]:
        if path.name == "test_fixtures.py":
            continue
        text = path.read_text()
        if "RINE_SHARED" in text or re.search(r"""parent\s*/\s*["']shared["']|\.\./shared""", text):
            offenders.append(path.name)
    assert not offenders, offenders
