"""rine.fileio: a file is its old content or its complete new one, and what is written is fsynced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rine import fileio
from rine.fileio import append_durably, atomic_file, atomic_write, atomic_write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")

    def half(f):
        f.write(b"new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    path = tmp_path / "model.safetensors"
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"weights")
        assert tmp.parent == path.parent and tmp.name.startswith("model.safetensors.") and tmp.name.endswith(".tmp")
        assert not path.exists()  # readers never see a half-written target
    assert path.read_bytes() == b"weights" and not tmp.exists()


def test_two_writers_of_one_target_get_their_own_temporaries(tmp_path):
    path = tmp_path / "head.pth"
    with atomic_file(path) as a, atomic_file(path) as b:
        assert a != b
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert path.read_bytes() == b"a"  # the outer block ends last: its rename wins


def test_bytes_text_and_json_round_trip(tmp_path):
    assert atomic_write(tmp_path / "b", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert atomic_write(tmp_path / "t", "фото").read_bytes() == "фото".encode()
    obj = {"format": "rine-features/1", "views": 10}
    text = atomic_write_json(tmp_path / "j.json", obj).read_text()
    assert text == json.dumps(obj, indent=2) + "\n" and json.loads(text) == obj


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(fileio.os, "fsync", recording)
    atomic_write(tmp_path / "shard-000000.npy", b"taps")
    assert any(s.startswith(str(tmp_path / "shard-000000.npy.")) for s in synced)  # the data, before the rename
    assert synced[-1] == str(tmp_path)  # then the folder, which holds the rename
    synced.clear()
    append_durably(tmp_path / "commits.jsonl", b'{"shard": 0}\n')
    append_durably(tmp_path / "commits.jsonl", b'{"shard": 1}\n')
    assert synced == [str(tmp_path / "commits.jsonl")] * 2
    assert (tmp_path / "commits.jsonl").read_bytes() == b'{"shard": 0}\n{"shard": 1}\n'
