"""End to end: `rine detect` on a tiny backbone, real image files and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from rine.cli import main
from rine.data.images import load_image
from rine.data.preprocess import preprocess
from rine.inference.detector import Detector

from conftest import OFFICIAL, assert_scores_as_reference_decode, write_image


@pytest.fixture(scope="module")
def demo_images():
    return [str(OFFICIAL / "real_aadlygmazf.jpg"), str(OFFICIAL / "fake_dalle_zzrybysskm.png")]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_detect_demo_images_matches_a_manual_forward(capsys, tiny_checkpoint_dir, tiny_detector, demo_images):
    code, out, err = run_cli(
        capsys, "detect", *demo_images, "--model", str(tiny_checkpoint_dir), "--format", "json", "--precision", "fp32"
    )
    assert code == 0, err
    records = json.loads(out)
    assert [r["path"] for r in records] == demo_images
    pixels = torch.cat([preprocess(load_image(p), tiny_detector.config.preprocess) for p in demo_images])
    with torch.no_grad():
        logits = tiny_detector.model(pixels).logits
    for r, logit in zip(records, logits, strict=True):
        assert r["error"] is None
        assert r["prob_fake"] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-6)
        assert r["is_fake"] == (r["prob_fake"] > 0.5)


def test_backbone_and_head_files(capsys, tmp_path, tiny_openai_file, tiny_checkpoint_dir, demo_images):
    """--backbone OpenAI-format file + --head official-format .pth give the folder model's numbers."""
    from rine.model.checkpoints import load_pretrained

    head, _ = load_pretrained(tiny_checkpoint_dir)
    pth = tmp_path / "head_trainable.pth"
    torch.save(head.state_dict(), pth)
    _, out_a, _ = run_cli(capsys, "detect", *demo_images, "--model", str(tiny_checkpoint_dir), "--format", "jsonl")
    code, out_b, err = run_cli(
        capsys, "detect", *demo_images, "--backbone", str(tiny_openai_file), "--head", str(pth), "--format", "jsonl"
    )
    assert code == 0, err
    a = [json.loads(line) for line in out_a.splitlines()]
    b = [json.loads(line) for line in out_b.splitlines()]
    for ra, rb in zip(a, b, strict=True):
        assert ra["prob_fake"] == pytest.approx(rb["prob_fake"], abs=1e-5)


def test_folders_globs_csv_and_output_file(capsys, tmp_path, sensitive_checkpoint_dir, sensitive_detector):
    root = tmp_path / "photos"
    write_image(root / "a" / "one.JPG", (240, 260), fmt="JPEG")
    write_image(root / "a" / "b" / "two.v2.final.png", (300, 230))
    write_image(root / "ünïcode ß.webp", (256, 256), fmt="WEBP")
    write_image(root / "alpha.png", (250, 240), mode="RGBA", seed=3)
    write_image(root / "grey.png", (230, 260), mode="L", seed=4)
    (root / "notes.txt").write_text("not scanned: folders only yield image files")
    write_image(tmp_path / "loose" / "x.png", (230, 230))
    out_csv = tmp_path / "scores.csv"
    code, _, err = run_cli(
        capsys, "detect", str(root), str(tmp_path / "loose" / "*.png"), "--precision", "fp32",
        "--model", str(sensitive_checkpoint_dir), "--format", "csv", "--output", str(out_csv), "--batch-size", "2",
    )
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    names = sorted(r["path"].split("/")[-1] for r in rows)
    assert names == sorted(["one.JPG", "two.v2.final.png", "ünïcode ß.webp", "x.png", "alpha.png", "grey.png"])
    assert all(r["error"] == "" for r in rows)
    # Each score is the detector's on the reference's decode (RGBA: alpha dropped; L: grey
    # replicated; WebP/JPEG: RGB order), and a wrong decode would be caught.
    assert_scores_as_reference_decode(
        sensitive_detector, [r["path"] for r in rows], [float(r["prob_fake"]) for r in rows], abs_tol=1e-5
    )


def make_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    good = write_image(folder / "good.jpg", (256, 256), fmt="JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    rng = np.random.default_rng(0)
    (folder / "garbage.png").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write_image(folder / "huge.png", (1200, 1100))  # refused by --max-pixels below
    Image.fromarray(rng.integers(0, 65535, (240, 240), dtype=np.uint16)).save(folder / "sixteen_bit.png")
    header = bytearray(write_image(folder / "tmp.png", (240, 240)).read_bytes())
    (folder / "tmp.png").unlink()
    header[16:24] = (100000).to_bytes(4, "big") * 2  # claims 100000 x 100000 pixels: a bomb
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")  # valid IHDR checksum
    (folder / "bomb.png").write_bytes(bytes(header))
    write_image(folder / "also_good.png", (224, 224), mode="RGBA")
    return folder


def test_bad_files_get_error_records_and_the_rest_is_scored(capsys, tmp_path, tiny_checkpoint_dir):
    folder = make_bad_files(tmp_path / "mixed")
    missing = str(tmp_path / "does-not-exist.jpg")
    code, out, err = run_cli(
        capsys, "detect", str(folder), missing, "--model", str(tiny_checkpoint_dir),
        "--format", "jsonl", "--max-pixels", "1000000", "--batch-size", "3",
    )
    assert code == 1
    assert "Traceback" not in err and "could not be scored" in err
    records = {r["path"].split("/")[-1]: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {
        "good.jpg", "also_good.png", "empty.png", "text.jpg", "garbage.png", "truncated.jpg",
        "huge.png", "sixteen_bit.png", "bomb.png", "does-not-exist.jpg",
    }
    expected_errors = {
        "empty.png": "empty file",
        "text.jpg": "not an image",
        "garbage.png": "not an image",
        "truncated.jpg": "truncated",
        "huge.png": "too many pixels",
        "bomb.png": "too many pixels",
        "does-not-exist.jpg": "no such file",
    }
    for name, fragment in expected_errors.items():
        assert records[name]["prob_fake"] is None
        assert fragment in records[name]["error"], (name, records[name]["error"])
        assert "\n" not in records[name]["error"]
    for name in ("good.jpg", "also_good.png", "sixteen_bit.png"):  # 16-bit grey: scaled to 8 bits (issue 14)
        assert records[name]["error"] is None and 0 <= records[name]["prob_fake"] <= 1
    # the tiny head's scores are alike for every noise image: the values are checked on the
    # sensitive head in test_folders_globs_csv_and_output_file


def test_a_corrupt_avif_is_a_clean_error_record(capsys, tmp_path, tiny_checkpoint_dir):
    """Pillow's AVIF decoder raises RuntimeError on a broken file: data.images.decode_errors
    makes it a `corrupt` record, and the other files are scored (it used to stop the run)."""
    from support.corrupt_images import corrupt_avif

    (tmp_path / "broken.avif").write_bytes(corrupt_avif())
    write_image(tmp_path / "ok.png", size=(64, 64))
    code, out, err = run_cli(capsys, "detect", str(tmp_path), "--model", str(tiny_checkpoint_dir), "--format", "jsonl")
    assert code == 1 and "Traceback" not in err
    records = {r["path"].split("/")[-1]: r for r in map(json.loads, out.splitlines())}
    assert records["broken.avif"]["error_kind"] == "corrupt"
    assert records["broken.avif"]["error"].startswith("corrupt or truncated image: ")
    assert records["ok.png"]["error"] is None and "error_kind" not in records["ok.png"]


def test_ten_crop_is_sigmoid_of_mean_logit(capsys, tmp_path, sensitive_checkpoint_dir, sensitive_detector):
    path = str(write_image(tmp_path / "big.png", size=(700, 500), seed=9))
    code, out, _ = run_cli(
        capsys, "detect", path, "--model", str(sensitive_checkpoint_dir), "--crop", "ten", "--format", "json",
        "--precision", "fp32",
    )
    assert code == 0
    from rine.config import PreprocessConfig

    views = preprocess(load_image(path), PreprocessConfig(crop="ten"))
    assert views.shape == (10, 3, 224, 224)
    with torch.no_grad():
        logits = sensitive_detector.model(views).logits
    prob = json.loads(out)[0]["prob_fake"]
    assert prob == pytest.approx(torch.sigmoid(logits.mean()).item(), abs=1e-6)
    assert abs(prob - torch.sigmoid(logits).mean().item()) > 0.01  # the other protocol would be caught


def test_missing_weights_stop_with_a_helpful_message(capsys, tmp_path, demo_images):
    code, out, err = run_cli(capsys, "detect", demo_images[0])
    assert code == 2 and out == ""
    assert "model_4class_trainable.pth" in err and "--backbone" in err and "--head" in err
    assert "Traceback" not in err


def test_usage_errors(capsys, tmp_path, tiny_checkpoint_dir, demo_images):
    code, _, err = run_cli(capsys, "detect", demo_images[0], "--head", str(tmp_path / "x.pth"))
    assert code == 2 and "--backbone" in err
    code, _, err = run_cli(capsys, "detect", demo_images[0], "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err
    code, _, err = run_cli(capsys, "detect", demo_images[0], "--decode-timeout", "-1")
    assert code == 2 and "--decode-timeout" in err
    with pytest.raises(SystemExit) as e:
        main(["detect", "--help"])
    assert e.value.code == 0
    assert "--crop" in capsys.readouterr().out


def test_help_and_usage_errors_do_not_load_torch():
    """`rine --help`, `rine COMMAND --help` and usage errors answer without importing torch
    (which takes seconds): every command's parser is built from torch-free modules."""
    code = (
        "import sys\n"
        "from rine.cli import build_parser\n"
        "build_parser()\n"
        "print(','.join(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == ""


def test_python_api_predict_accepts_paths_and_pil(tiny_detector, tiny_checkpoint_dir, demo_images):
    preds = tiny_detector.predict([demo_images[0], Image.open(demo_images[1])])
    assert len(preds) == 2 and all(p.error is None for p in preds)
    assert len(preds[0].block_contribution) == 3
    assert sum(preds[0].block_contribution) == pytest.approx(1.0, abs=1e-5)
    importance = tiny_detector.block_importance()
    assert len(importance) == 3 and sum(importance) == pytest.approx(1.0, abs=1e-5)
    again = Detector.from_pretrained(str(tiny_checkpoint_dir), device="cpu").predict(demo_images[0])
    assert again[0].prob_fake == pytest.approx(preds[0].prob_fake, abs=1e-6)


def test_backbone_and_head_folder_keep_the_folders_crop(tmp_path, tiny_openai_file, tiny_checkpoint_dir):
    """--backbone with --head FOLDER uses the folder's preprocessing unless --crop says otherwise."""
    from dataclasses import replace

    from rine.model.checkpoints import load_pretrained, save_pretrained

    head, config = load_pretrained(tiny_checkpoint_dir)
    ten = tmp_path / "ten-crop-ckpt"
    save_pretrained(head, replace(config, preprocess=replace(config.preprocess, crop="ten")), ten)
    assert Detector.from_files(str(tiny_openai_file), str(ten)).config.preprocess.crop == "ten"
    assert Detector.from_files(str(tiny_openai_file), str(ten), crop="center").config.preprocess.crop == "center"


def test_failures_are_not_held_back_behind_a_batch(tiny_detector, tmp_path):
    """Unreadable files come out as soon as they are known, not when a batch fills up."""
    import itertools

    missing = (str(tmp_path / f"missing{i}.png") for i in range(3))
    endless_good = itertools.repeat(str(write_image(tmp_path / "ok.png", (230, 230))))
    stream = tiny_detector.predict_iter(itertools.chain(missing, endless_good), batch_size=64)
    first = list(itertools.islice(stream, 3))
    assert [p.error for p in first] == ["no such file"] * 3


def test_detect_with_process_decoder(capsys, tmp_path, tiny_checkpoint_dir):
    """`--decoder processes` (the GPU default) gives the thread decoder's records, errors included."""
    good = str(write_image(tmp_path / "a.png", size=(300, 260), seed=3))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"junk")
    outs = {}
    for decoder in ("threads", "processes"):
        code, out, err = run_cli(capsys, "detect", good, str(bad), "--model", str(tiny_checkpoint_dir),
                                 "--format", "jsonl", "--precision", "fp32", "--decoder", decoder)
        assert code == 1, err  # one file could not be read
        outs[decoder] = [json.loads(line) for line in out.splitlines()]
    assert outs["processes"] == outs["threads"]
    assert outs["processes"][1]["error"] and outs["processes"][0]["prob_fake"] is not None


def test_max_bytes_refuses_large_files_and_reads_sizes(capsys, tmp_path, tiny_checkpoint_dir):
    small = write_image(tmp_path / "small.jpg", (224, 224), fmt="JPEG")
    big = write_image(tmp_path / "big.png", (900, 900))  # noise PNG: well over 100 KiB
    assert small.stat().st_size < 100 * 1024 < big.stat().st_size, (small.stat().st_size, big.stat().st_size)
    code, out, err = run_cli(capsys, "detect", str(small), str(big), "--model", str(tiny_checkpoint_dir),
                             "--format", "jsonl", "--max-bytes", "100K")
    assert code == 1
    records = {r["path"].split("/")[-1]: r for r in map(json.loads, out.splitlines())}
    assert records["small.jpg"]["error"] is None
    assert records["big.png"]["prob_fake"] is None and "too large" in records["big.png"]["error"]
    assert f"limit {100 * 1024}" in records["big.png"]["error"]
    for bad in ("lots", "inf", "1e400", "0"):
        with pytest.raises(SystemExit) as e:
            main(["detect", str(small), "--max-bytes", bad])
        assert e.value.code == 2 and "size" in capsys.readouterr().err


def test_resume_scores_only_what_an_interrupted_run_left(capsys, tmp_path, tiny_checkpoint_dir):
    images = [str(write_image(tmp_path / f"img{i}.png", (230 + 10 * i, 240), seed=i)) for i in range(4)]
    model = ("--model", str(tiny_checkpoint_dir))
    full = tmp_path / "full.jsonl"
    assert run_cli(capsys, "detect", *images, *model, "--output", str(full))[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    # A run killed while writing its third record: two whole lines and half of the next.
    part = tmp_path / "part.jsonl"
    part.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    code, _, err = run_cli(capsys, "detect", *images, *model, "--output", str(part), "--resume")
    assert code == 0, err
    assert "2 of 4 inputs already have a record; scoring 2" in err and "unfinished last record" in err
    records = [json.loads(line) for line in part.read_text().splitlines()]
    assert [r["path"] for r in records] == images  # each once, in order
    assert part.read_text().startswith(lines[0] + lines[1])  # what was there is kept as is
    expected = [json.loads(line) for line in lines]
    np.testing.assert_allclose([r["prob_fake"] for r in records], [r["prob_fake"] for r in expected], atol=1e-6)
    # Nothing left to do: the file is not touched.
    before = part.read_bytes()
    code, _, err = run_cli(capsys, "detect", *images, *model, "--output", str(part), "--resume")
    assert code == 0 and "4 of 4" in err and part.read_bytes() == before


def test_resume_matches_places_not_spellings(capsys, tmp_path, tiny_checkpoint_dir, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"img{i}.png", (230, 240), seed=i)
    (folder / "z.png").symlink_to(folder / "img0.png")  # another input, though the same pixels
    model = ("--model", str(tiny_checkpoint_dir))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scores.jsonl"
    # First run: the folder (4 records); then two are lost, as after a kill between records.
    assert run_cli(capsys, "detect", "imgs", *model, "-o", str(out))[0] == 0
    lines = out.read_text().splitlines(keepends=True)
    assert [json.loads(line)["path"] for line in lines] == [f"imgs/img{i}.png" for i in range(3)] + ["imgs/z.png"]
    out.write_text("".join(lines[:2]))
    # Resumed with the files spelled another way: absolute, and with `./`.
    spelled = [str(folder / "img0.png"), "./imgs/img1.png", "./imgs/img2.png", "./imgs/z.png"]
    code, _, err = run_cli(capsys, "detect", *spelled, *model, "-o", str(out), "--resume")
    assert code == 0, err
    assert "2 of 4 inputs already have a record; scoring 2" in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records[2:]] == ["imgs/img2.png", "imgs/z.png"]  # as expand_inputs spells them


def test_resume_csv_and_what_it_refuses(capsys, tmp_path, tiny_checkpoint_dir):
    images = [str(write_image(tmp_path / f"img{i}.jpg", (240, 240), fmt="JPEG", seed=i)) for i in range(3)]
    model = ("--model", str(tiny_checkpoint_dir))
    out = tmp_path / "scores.csv"
    assert run_cli(capsys, "detect", *images[:2], *model, "--format", "csv", "-o", str(out))[0] == 0
    code, _, err = run_cli(capsys, "detect", *images, *model, "--format", "csv", "-o", str(out), "--resume")
    assert code == 0 and "2 of 3" in err
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["path"] for r in rows] == images and all(r["error"] == "" for r in rows)

    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"path": "a.png", "prob_fake": 0.5}\nmy own notes, not a record\n')
    before = notes.read_bytes()
    code, _, err = run_cli(capsys, "detect", *images, *model, "-o", str(notes), "--resume")
    assert code == 2 and "line 2" in err and notes.read_bytes() == before  # refused, left as it was
    code, _, err = run_cli(capsys, "detect", *images, *model, "--format", "csv", "-o", str(notes), "--resume")
    assert code == 2 and "not a rine detect record" in err and notes.read_bytes() == before
    other = tmp_path / "other.csv"
    other.write_bytes(b"name,score\r\nx,1\r\n")
    code, _, err = run_cli(capsys, "detect", *images, *model, "--format", "csv", "-o", str(other), "--resume")
    assert code == 2 and "header" in err and other.read_bytes() == b"name,score\r\nx,1\r\n"
    # Lines a person appended, or rows with other line ends: not a cut record, never deleted.
    for extra in (b"reviewed by alice: all fine\n", b"x.png,0.5,0.1,False,\n"):
        edited = tmp_path / "edited.csv"
        edited.write_bytes(out.read_bytes() + extra)
        before = edited.read_bytes()
        code, _, err = run_cli(capsys, "detect", *images, *model, "--format", "csv", "-o", str(edited), "--resume")
        assert code == 2 and "not a rine detect record" in err and edited.read_bytes() == before
    code, _, err = run_cli(capsys, "detect", *images, *model, "--resume")
    assert code == 2 and "--output" in err
    code, _, err = run_cli(capsys, "detect", *images, *model, "--format", "json", "-o", str(tmp_path / "x.json"), "--resume")
    assert code == 2 and "jsonl or csv" in err


def test_csv_has_error_kind_and_an_older_csv_resumes_in_its_own_columns(capsys, tmp_path, tiny_checkpoint_dir):
    """csv rows carry error_kind (last column); a file written before that column existed
    (path..error) resumes: its new rows have its header's width, not one more column."""
    images = [str(write_image(tmp_path / f"img{i}.png", (240, 240), seed=i)) for i in range(2)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    model = ("--model", str(tiny_checkpoint_dir))
    new = tmp_path / "new.csv"
    assert run_cli(capsys, "detect", images[0], str(broken), *model, "-o", str(new))[0] == 1
    rows = list(csv.DictReader(new.open(newline="")))
    assert [(r["error"] != "", r["error_kind"]) for r in rows] == [(False, ""), (True, "not_image")]

    old = tmp_path / "old.csv"  # what an earlier rine wrote: five columns
    old.write_bytes(b"path,prob_fake,logit,is_fake,error\r\n" + f"{images[0]},0.5,0.0,False,\r\n".encode())
    code, _, err = run_cli(capsys, "detect", images[0], images[1], str(broken), *model, "-o", str(old), "--resume",
                           "--no-provenance")
    assert code == 1 and "1 of 3 inputs already have a record" in err, err
    rows = list(csv.reader(old.open(newline="")))
    assert rows[0] == ["path", "prob_fake", "logit", "is_fake", "error"]
    assert [len(r) for r in rows] == [5] * 4 and [r[0] for r in rows[1:]] == [images[0], images[1], str(broken)]
    assert rows[3][4].startswith("not an image")


def test_resume_refuses_a_csv_with_other_columns(capsys, tmp_path, tiny_checkpoint_dir, monkeypatch):
    """An uncalibrated run writes 5 columns, one with a threshold (a calibrated model or
    --threshold) 7: resuming one file with the other run is refused before scoring, the file
    untouched (its unfinished last row included); the same columns resume as before."""
    images = [str(write_image(tmp_path / f"img{i}.png", (240, 240), seed=i)) for i in range(3)]
    model = ("--model", str(tiny_checkpoint_dir))
    plain, decided = tmp_path / "plain.csv", tmp_path / "decided.csv"
    assert run_cli(capsys, "detect", *images[:2], *model, "-o", str(plain))[0] == 0
    assert run_cli(capsys, "detect", *images[:2], *model, "--threshold", "0.7", "-o", str(decided))[0] == 0
    # the detector's columns first (error_kind beside error), then the provenance columns and the decision
    assert plain.read_bytes().startswith(b"path,prob_fake,logit,is_fake,error,error_kind,provenance_source_type,")
    assert decided.read_bytes().startswith(
        b"path,prob_fake,logit,is_fake,error,error_kind,threshold,verdict,provenance_source_type,")
    plain.write_bytes(plain.read_bytes() + b"cut.png,0.4")  # killed while writing a row
    import rine.inference.detector as detector_module

    real_predict_iter = detector_module.Detector.predict_iter

    def no_scoring(*a, **k):
        raise AssertionError("scored although the resume was refused")

    monkeypatch.setattr(detector_module.Detector, "predict_iter", no_scoring)
    prov = "provenance_source_type"  # the provenance columns follow the detector's
    for out, extra, theirs, ours in ((plain, ("--threshold", "0.7"), f"error,error_kind,{prov}",
                                      f"error,error_kind,threshold,verdict,{prov}"),
                                     (decided, (), f"error,error_kind,threshold,verdict,{prov}",
                                      f"error,error_kind,{prov}")):
        before = out.read_bytes()
        code, _, err = run_cli(capsys, "detect", *images, *model, *extra, "-o", str(out), "--resume")
        assert code == 2, err
        assert str(out) in err and f"has the columns path,prob_fake,logit,is_fake,{theirs}," in err, err
        assert f"this run writes path,prob_fake,logit,is_fake,{ours}," in err, err
        assert "another -o" in err and "without --resume" in err
        assert out.read_bytes() == before
    # The same columns: the cut row goes, the third image is appended, the first two are kept.
    monkeypatch.setattr(detector_module.Detector, "predict_iter", real_predict_iter)
    for out, extra in ((plain, ()), (decided, ("--threshold", "0.7"))):
        kept = out.read_bytes().split(b"cut.png")[0]
        code, _, err = run_cli(capsys, "detect", *images, *model, *extra, "-o", str(out), "--resume")
        assert code == 0 and "2 of 3 inputs already have a record; scoring 1" in err, err
        assert out.read_bytes().startswith(kept)
        rows = list(csv.reader(out.open(newline="")))
        assert [r[0] for r in rows[1:]] == images and len({len(r) for r in rows}) == 1


def test_ctrl_c_keeps_the_records_written_and_says_how_to_resume(capsys, tmp_path, tiny_checkpoint_dir, monkeypatch):
    images = [str(write_image(tmp_path / f"img{i}.png", (240, 240), seed=i)) for i in range(3)]
    model = ("--model", str(tiny_checkpoint_dir))
    out = tmp_path / "scores.jsonl"
    real_predict_iter = Detector.predict_iter

    def interrupted_after_one(self, *args, **kwargs):
        stream = real_predict_iter(self, *args, **kwargs)
        yield next(stream)
        stream.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "predict_iter", interrupted_after_one)
    code, _, err = run_cli(capsys, "detect", *images, *model, "-o", str(out))
    assert code == 130 and "1 of 3 records written" in err and "--resume" in err
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == images[:1]
    monkeypatch.setattr(Detector, "predict_iter", real_predict_iter)
    code, _, err = run_cli(capsys, "detect", *images, *model, "-o", str(out), "--resume")
    assert code == 0 and "1 of 3" in err
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == images


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_gives_the_same_scores(capsys, tmp_path, tiny_checkpoint_dir):
    images = [str(write_image(tmp_path / f"img{i}.png", (240, 250), seed=i)) for i in range(3)]
    args = ("detect", *images, "--model", str(tiny_checkpoint_dir), "--precision", "fp32", "--batch-size", "2")
    code, plain, err = run_cli(capsys, *args, "--format", "jsonl")
    assert code == 0, err
    code, compiled, err = run_cli(capsys, *args, "--format", "jsonl", "--compile")
    assert code == 0 and "torch.compile failed" not in err
    a, b = ([json.loads(line)["prob_fake"] for line in out.splitlines()] for out in (plain, compiled))
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_resume_counts_earlier_errors_in_the_exit_status(capsys, tmp_path, tiny_checkpoint_dir):
    good = [str(write_image(tmp_path / f"img{i}.png", (240, 240), seed=i)) for i in range(2)]
    missing = str(tmp_path / "gone.png")
    model = ("--model", str(tiny_checkpoint_dir))
    out = tmp_path / "scores.jsonl"
    assert run_cli(capsys, "detect", good[0], missing, *model, "-o", str(out))[0] == 1
    code, _, err = run_cli(capsys, "detect", good[0], missing, good[1], *model, "-o", str(out), "--resume")
    assert code == 1 and "2 of 3" in err and "1 of them errors, not retried" in err
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [good[0], missing, good[1]]
    code, _, err = run_cli(capsys, "detect", good[0], good[1], *model, "-o", str(out), "--resume")
    assert code == 0 and "2 of 2" in err  # the error is not among these inputs


def test_bad_output_device_and_workers_stop_before_loading_the_model(capsys, tmp_path, monkeypatch):
    import rine.cli.common as common

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the usage error was found")

    monkeypatch.setattr(common, "load_detector", no_load)
    img = str(write_image(tmp_path / "a.png", (230, 240)))
    (tmp_path / "adir").mkdir()
    for argv, message in (
        (["-o", str(tmp_path / "missing" / "x.jsonl")], "does not exist; create it first"),
        (["-o", str(tmp_path / "adir")], "is a folder; give a file name"),
        (["--device", "gpu"], "not a device; use auto, cpu, cuda"),
    ):
        code, _, err = run_cli(capsys, "detect", img, *argv)
        assert code == 2 and message in err, (argv, err)
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "detect", img, "--device", "cuda")
        assert code == 2 and "sees no CUDA GPU" in err
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["detect", img, "--workers", bad])
        assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_output_format_follows_the_file_name_and_resumes_without_format(capsys, tmp_path, tiny_checkpoint_dir):
    images = [str(write_image(tmp_path / f"img{i}.png", (230, 240), seed=i)) for i in range(2)]
    out = tmp_path / "scores.csv"
    assert run_cli(capsys, "detect", images[0], "--model", str(tiny_checkpoint_dir), "-o", str(out))[0] == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["path"] for r in rows] == images[:1]
    code, _, err = run_cli(capsys, "detect", *images, "--model", str(tiny_checkpoint_dir), "-o", str(out), "--resume")
    assert code == 0 and "1 of 2 inputs already have a record" in err, err
    assert [r["path"] for r in csv.DictReader(out.open(newline=""))] == images
    as_json = tmp_path / "scores.json"
    assert run_cli(capsys, "detect", images[0], "--model", str(tiny_checkpoint_dir), "-o", str(as_json))[0] == 0
    assert [r["path"] for r in json.loads(as_json.read_text())] == images[:1]


@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes")
def test_file_names_that_are_not_utf8(capsys, tmp_path, tiny_checkpoint_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    write_image(folder / "a.png", (230, 240))
    name = os.fsdecode(b"b\xff.png")  # a byte that is not UTF-8: a surrogate in Python
    shutil.copy(folder / "a.png", folder / name)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"scores.{fmt}"
        code, _, err = run_cli(capsys, "detect", str(folder), "--model", str(tiny_checkpoint_dir), "-o", str(out))
        assert code == 0, err
        code, _, err = run_cli(capsys, "detect", str(folder), "--model", str(tiny_checkpoint_dir), "-o", str(out),
                               "--resume")
        assert code == 0 and "2 of 2 inputs already have a record" in err, err
    # csv keeps the name's bytes as they are on disk.
    assert b"b\xff.png" in (tmp_path / "scores.csv").read_bytes()


def test_folders_that_cannot_be_read_are_error_records(capsys, tmp_path, tiny_checkpoint_dir, monkeypatch):
    # Tests run as root in CI, where permissions do not stop reading: the refusal is simulated.
    import rine.cli.common as common

    good = tmp_path / "imgs"
    (good / "locked").mkdir(parents=True)
    write_image(good / "a.png", (230, 240))
    real_walk = os.walk

    def walk(top, **kw):
        for root, dirs, files in real_walk(top, **kw):
            if root.endswith("locked"):
                kw["onerror"](PermissionError(13, "Permission denied", root))
                continue
            yield root, dirs, files

    monkeypatch.setattr(common.os, "walk", walk)
    code, out, err = run_cli(capsys, "detect", str(good), "--model", str(tiny_checkpoint_dir), "--format", "jsonl")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "1 of 2 inputs could not be scored" in err, err
    assert {r["path"]: r["error"] for r in records} == {
        str(good / "locked"): "cannot read folder: Permission denied", str(good / "a.png"): None}
    assert {r["path"]: r.get("error_kind") for r in records} == {str(good / "locked"): "unreadable", str(good / "a.png"): None}
    from pathlib import Path

    real_is_dir = Path.is_dir

    def is_dir(self):
        if "locked" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    code, out, err = run_cli(capsys, "detect", str(good / "locked" / "x.png"), "--model", str(tiny_checkpoint_dir),
                             "--format", "jsonl")
    assert code == 1 and json.loads(out)["error"] == "cannot read path: Permission denied", out


def test_messages_keep_their_quotes_and_name_the_limit(capsys, tmp_path, tiny_checkpoint_dir):
    img = str(write_image(tmp_path / "a.png", (300, 300)))
    code, _, err = run_cli(capsys, "detect", img, "--model", "nosuch")
    assert code == 2 and "error: 'nosuch'" in err, err
    code, _, err = run_cli(capsys, "detect", img, "--model", str(tiny_checkpoint_dir), "--max-pixels", "50K")
    assert code == 1 and "1 over --max-pixels (raise it to score them)" in err, err


def test_max_pixels_can_go_above_pillows_warning_limit(tmp_path, monkeypatch):
    from rine.data.images import ImageLoadError

    # Pillow warns ("decompression bomb") from MAX_IMAGE_PIXELS and refuses from twice that.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = write_image(tmp_path / "a.png", (150, 100))  # 15,000 px: between the two
    assert load_image(path, max_pixels=20_000).size == (150, 100)
    with pytest.raises(ImageLoadError, match="too many pixels: 150x100 = 15000 > limit 12000"):
        load_image(path, max_pixels=12_000)
    big = write_image(tmp_path / "b.png", (250, 100))
    with pytest.raises(ImageLoadError, match="over Pillow's own limit"):
        load_image(big, max_pixels=None)


def test_verbose_counts_before_and_after_the_command(monkeypatch):
    import rine.cli as cli

    seen = []
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kw: seen.append(kw["level"]))
    parser = cli.build_parser()
    for argv, level in ((["models"], 30), (["-v", "models"], 20), (["models", "-v"], 20), (["-v", "models", "-v"], 10)):
        seen.clear()
        monkeypatch.setattr(cli, "build_parser", lambda: parser)
        assert cli.main(argv) == 0
        assert seen == [level], (argv, seen)


def test_csv_to_a_stdout_that_is_not_a_console(capsys, tmp_path, tiny_checkpoint_dir):
    import contextlib
    import io as _io

    img = str(write_image(tmp_path / "a.png", (230, 240)))
    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["detect", img, "--model", str(tiny_checkpoint_dir), "--format", "csv"])
    assert code == 0 and buf.getvalue().startswith("path,prob_fake,logit,is_fake,error")


def test_resume_takes_the_format_of_the_file_and_keeps_unreadable_records_once(capsys, tmp_path, tiny_checkpoint_dir,
                                                                               monkeypatch):
    import rine.cli.common as common

    images = [str(write_image(tmp_path / f"img{i}.png", (230, 240), seed=i)) for i in range(2)]
    model = ("--model", str(tiny_checkpoint_dir))
    # A run from before the format followed the file name: jsonl records in a .csv file.
    old = tmp_path / "old.csv"
    assert run_cli(capsys, "detect", images[0], *model, "-o", str(old), "--format", "jsonl")[0] == 0
    code, _, err = run_cli(capsys, "detect", *images, *model, "-o", str(old), "--resume")
    assert code == 0 and "1 of 2 inputs already have a record" in err, err
    assert [json.loads(line)["path"] for line in old.read_text().splitlines()] == images
    # A folder that cannot be listed: one error record, kept once over resumes, counted each time.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_walk = os.walk

    def walk(top, **kw):
        if str(top).endswith("locked"):
            kw["onerror"](PermissionError(13, "Permission denied", str(top)))
            return
        yield from real_walk(top, **kw)

    monkeypatch.setattr(common.os, "walk", walk)
    out = tmp_path / "scores.jsonl"
    assert run_cli(capsys, "detect", str(locked), images[0], *model, "-o", str(out))[0] == 1
    for _ in range(2):
        code, _, err = run_cli(capsys, "detect", str(locked), *images, *model, "-o", str(out), "--resume")
        assert code == 1 and "already have a record (1 of them errors" in err, err
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted([str(locked), *images])
    code, _, err = run_cli(capsys, "detect", str(locked), *model, "-o", str(out), "--resume")
    assert code == 1 and "1 of 1 inputs already have a record" in err


def test_output_paths_as_the_shell_left_them(capsys, tmp_path, tiny_checkpoint_dir, monkeypatch):
    from rine.cli.common import check_output_dir, pixel_count

    img = str(write_image(tmp_path / "a.png", (230, 240)))
    monkeypatch.setenv("HOME", str(tmp_path))
    # `--output=~/x.jsonl`: the shell leaves the ~; the check and the writer must agree on it.
    assert run_cli(capsys, "detect", img, "--model", str(tiny_checkpoint_dir), "--output=~/x.jsonl")[0] == 0
    assert json.loads((tmp_path / "x.jsonl").read_text())["path"] == img
    # An existing file is written in place, whatever its folder allows.
    assert run_cli(capsys, "detect", img, "--model", str(tiny_checkpoint_dir), "-o", os.devnull)[0] == 0
    # The output-folder check creates nothing and removes nothing that was there.
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    check_output_dir("newdir/../results")
    check_output_dir("deep/er/out")
    assert (tmp_path / "results").is_dir() and not (tmp_path / "newdir").exists() and not (tmp_path / "deep").exists()
    assert pixel_count("4.1M") == 4_100_000 and pixel_count("40M") == 40_000_000 and pixel_count("1,500") == 1500
