"""Layout readers on small trees of generated images: counts equal what is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rine.data.layouts import UFD20_SETS, list_images, read_layout
from rine.data.testsets import LayoutError

from support.image_trees import build_ufd20, make_files


def counts(result) -> dict:
    return {s.name: (s.n_real, s.n_fake) for s in result.sets}


def test_list_images_odd_names(tmp_path):
    files = make_files(tmp_path / "d", 8)
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / ".hidden.png").write_bytes(b"")
    (tmp_path / "d" / "._apple.PNG").write_bytes(b"")
    assert list_images(tmp_path / "d") == sorted(str(f) for f in files)


def test_ufd20(tmp_path, caplog):
    expected = build_ufd20(tmp_path)
    result = read_layout("ufd20", tmp_path)
    assert counts(result) == expected
    assert [s.name for s in result.sets] == [s for s in UFD20_SETS if s in expected]
    assert set(result.missing) == set(UFD20_SETS) - set(expected)
    assert "stylegan" in caplog.text  # missing sets are warned about, never silent
    progan = next(s for s in result.sets if s.name == "progan")
    assert all(("0_real" in p) == (y == 0) for p, y in progan.items)
    # the diffusion sets share the real folder of their source
    dalle = next(s for s in result.sets if s.name == "dalle")
    assert all("laion" in p for p, y in dalle.items if y == 0)
    # a parent folder holding test/ works too
    assert counts(read_layout("ufd20", _wrap_test(tmp_path))) == expected


def _wrap_test(tmp_path: Path) -> Path:
    parent = tmp_path.parent / (tmp_path.name + "-parent")
    parent.mkdir(exist_ok=True)
    link = parent / "test"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    return parent


def test_ufd20_errors_name_the_path(tmp_path):
    build_ufd20(tmp_path, sets=("biggan",))
    with pytest.raises(LayoutError, match="stylegan"):
        read_layout("ufd20", tmp_path, sets=["stylegan"])  # asked for explicitly: an error
    with pytest.raises(LayoutError, match="unknown test set"):
        read_layout("ufd20", tmp_path, sets=["nope"])
    (tmp_path / "crn" / "0_real").mkdir(parents=True)
    make_files(tmp_path / "crn" / "1_fake", 1)
    with pytest.raises(LayoutError, match=r"no images in .*crn.0_real"):
        read_layout("ufd20", tmp_path)
    with pytest.raises(LayoutError, match="no test set"):
        read_layout("ufd20", tmp_path / "empty-root")


@pytest.mark.parametrize("real_name", ["RAISEpng", "real_RAISE_1k"])
def test_synthbuster(tmp_path, real_name):
    make_files(tmp_path / real_name, 5)
    make_files(tmp_path / "synthbuster" / "dalle2", 2)
    make_files(tmp_path / "synthbuster" / "midjourney-v5", 3)
    (tmp_path / "synthbuster" / "dalle2" / "prompts.csv").write_text("a,b\n")
    (tmp_path / real_name / ".DS_Store").write_bytes(b"\0")
    result = read_layout("synthbuster", tmp_path)
    assert counts(result) == {"dalle2": (5, 2), "midjourney-v5": (5, 3)}
    # what the scans left out, per set: the shared real folder's in each
    assert {s.name: s.skipped.counts() for s in result.sets} == {"dalle2": {".csv": 1, "hidden": 1},
                                                                 "midjourney-v5": {"hidden": 1}}
    assert len(result.missing) == 7
    # the synthbuster folder itself as root, real folder beside it
    assert counts(read_layout("synthbuster", tmp_path / "synthbuster")) == counts(result)
    assert counts(read_layout("synthbuster", tmp_path, real_dir=tmp_path / real_name)) == counts(
        result
    )


def test_synthbuster_without_real_is_an_error(tmp_path):
    make_files(tmp_path / "dalle2", 2)
    with pytest.raises(LayoutError, match="RAISEpng"):
        read_layout("synthbuster", tmp_path)


def test_genimage_labels_by_name(tmp_path):
    make_files(tmp_path / "ADM" / "imagenet_ai_0508_adm" / "val" / "ai", 3)
    make_files(tmp_path / "ADM" / "imagenet_ai_0508_adm" / "val" / "nature", 2)
    make_files(tmp_path / "ADM" / "imagenet_ai_0508_adm" / "train" / "ai", 4)
    make_files(tmp_path / "BigGAN" / "imagenet_ai_0419_biggan" / "val" / "ai", 1)
    make_files(tmp_path / "BigGAN" / "imagenet_ai_0419_biggan" / "val" / "nature", 4)
    result = read_layout("genimage", tmp_path)
    assert counts(result) == {"ADM": (2, 3), "BigGAN": (4, 1)}
    adm = result.sets[0]
    # `ai` sorts before `nature`: labels must come from the name, not the order
    assert all((Path(p).parent.name == "ai") == (y == 1) for p, y in adm.items)
    with pytest.raises(LayoutError, match=r"train.nature"):  # train/ has no nature/ folder here
        read_layout("genimage", tmp_path, split="train", sets=["ADM"])


def test_genimage_missing_class(tmp_path):
    make_files(tmp_path / "ADM" / "x" / "val" / "ai", 3)
    with pytest.raises(LayoutError, match=r"nature"):
        read_layout("genimage", tmp_path)


def test_folder_layout(tmp_path, caplog):
    # Chameleon-like (classes at the top), AIGCDetectBenchmark-like (set/category/class),
    # names in other spellings and cases
    root = tmp_path / "bench"
    make_files(root / "progan" / "airplane" / "0_real", 2)
    make_files(root / "progan" / "airplane" / "1_fake", 3)
    make_files(root / "progan" / "cat" / "0_real", 1)
    make_files(root / "progan" / "cat" / "1_fake", 1)
    make_files(root / "wild" / "Real", 2)
    make_files(root / "wild" / "FAKE", 4)
    make_files(root / "gen" / "sub" / "nature", 1)
    make_files(root / "gen" / "sub" / "ai", 2)
    make_files(root / "onlyfake" / "1_fake", 2)
    result = read_layout("folder", root)
    assert counts(result) == {"gen": (1, 2), "onlyfake": (0, 2), "progan": (3, 4), "wild": (2, 4)}
    assert "onlyfake has only fake" in caplog.text
    deeper = read_layout("folder", root, set_depth=2)
    assert counts(deeper)["progan/airplane"] == (2, 3) and counts(deeper)["wild"] == (2, 4)
    with pytest.raises(LayoutError, match="no real/fake folders"):
        read_layout("folder", root, max_depth=1)  # class folders sit deeper than one level
    top = tmp_path / "chameleon"
    make_files(top / "0_real", 3)
    make_files(top / "1_fake", 1)
    assert counts(read_layout("folder", top)) == {"chameleon": (3, 1)}


def test_manifest_csv_and_jsonl(tmp_path):
    files = make_files(tmp_path / "imgs", 4)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        f"path,label,set\n{rel[0]},0,a\n{rel[1]},fake,a\n{rel[2]},1_fake,b\n{files[3]},real,\n",
        encoding="utf-8",
    )
    result = read_layout("manifest", csv_path)
    assert counts(result) == {"a": (1, 1), "b": (0, 1), "list": (1, 0)}
    assert result.sets[0].items[0][0] == str(files[0])  # relative to the manifest's folder
    jl = tmp_path / "list.jsonl"
    jl.write_text(
        "\n".join(json.dumps({"path": r, "label": i % 2}) for i, r in enumerate(rel)) + "\n",
        encoding="utf-8",
    )
    assert counts(read_layout("manifest", jl)) == {"list": (2, 2)}
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,maybe\n", encoding="utf-8")
    with pytest.raises(LayoutError, match=r"bad.csv:2"):
        read_layout("manifest", bad)
    with pytest.raises(LayoutError, match="header"):
        (tmp_path / "nohdr.csv").write_text("x.png,1\n", encoding="utf-8")
        read_layout("manifest", tmp_path / "nohdr.csv")


def test_manifest_json_documents(tmp_path):
    """A `.json` manifest may be a pretty-printed list, an {"items": [...]} object, or JSON Lines."""
    files = make_files(tmp_path / "imgs", 4)
    rows = [{"path": f.relative_to(tmp_path).as_posix(), "label": ["real", "fake"][i % 2], "set": "s"}
            for i, f in enumerate(files)]
    as_list, as_object, as_lines = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    as_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    as_object.write_text(json.dumps({"items": rows}, indent=2), encoding="utf-8")
    as_lines.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    for path in (as_list, as_object, as_lines):
        result = read_layout("manifest", path)
        assert counts(result) == {"s": (2, 2)}
        assert [p for p, _ in result.sets[0].items] == [str(f) for f in files]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(rows[1], indent=2), encoding="utf-8")  # a single object is a single row
    assert counts(read_layout("manifest", one)) == {"s": (0, 1)}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rows[0], {"label": 1}], indent=2), encoding="utf-8")
    with pytest.raises(LayoutError, match="bad.json: entry 2: no path"):
        read_layout("manifest", bad)
    with pytest.raises(LayoutError, match="a list of"):
        (tmp_path / "num.json").write_text("3", encoding="utf-8")
        read_layout("manifest", tmp_path / "num.json")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows, indent=2).replace('"label"', "label", 1), encoding="utf-8")
    with pytest.raises(LayoutError, match=r"broken.json:4:5: not valid JSON"):  # where it broke, not "line 1"
        read_layout("manifest", broken)
    # JSON strings may hold U+2028 unescaped: a JSONL line is split at "\n" only
    odd = tmp_path / "imgs" / "a\u2028b.png"
    odd.write_bytes(files[0].read_bytes())
    jl = tmp_path / "odd.jsonl"
    jl.write_text(json.dumps({"path": str(odd), "label": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_layout("manifest", jl).sets[0].items == [(str(odd), 1)]
