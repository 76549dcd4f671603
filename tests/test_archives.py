"""What scoring real-world archives turned up (issue 14): folder scans, odd formats and
modes, one-class sets in the metrics, tables and plots, duplicates, messages."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rine.cli import main
from rine.data.images import ImageLoadError, load_image
from rine.data.layouts import list_images
from rine.data.scan import Skipped, walk_images
from rine.evaluation.results import Condition, RunResult, metrics_of
from rine.metrics import compute_metrics, mean_metrics

from conftest import write_image
from support.serve_proc import wait_ready


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def detect(capsys, ckpt, *argv):
    return run_cli(capsys, "detect", *map(str, argv), "--model", str(ckpt), "--format", "jsonl", "--no-progress")


# ---------------------------------------------------------------------- 2, 3: folder scans
@pytest.fixture()
def archive(tmp_path) -> Path:
    """A folder as a camera card or a git checkout leaves it: hidden files, a hidden folder,
    and files of formats rine does not decode."""
    root = tmp_path / "archive"
    write_image(root / "a.png", (40, 40), seed=1)
    write_image(root / "sub" / "b.jpg", (40, 40), seed=2, fmt="JPEG")
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")  # macOS metadata
    write_image(root / ".x.png", (40, 40), seed=3)
    write_image(root / ".git" / "objects" / "c.png", (40, 40), seed=4)
    (root / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    (root / "sub" / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    (root / "sub" / "scan.jp2").write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20))
    return root


def test_every_folder_scan_takes_the_same_files(archive):
    """One rule: `rine detect DIR` (expand_inputs), the benchmark layouts and the training
    layouts all leave hidden files and folders out."""
    from rine.data.datasets import _images
    from rine.data.scan import expand_inputs

    expected = [str(archive / "a.png"), str(archive / "sub" / "b.jpg")]
    assert list(walk_images(archive)) == expected
    assert list(expand_inputs([str(archive)], [])) == expected
    assert list_images(archive) == expected
    assert _images(archive) == [str(archive / "a.png")]  # one folder, not recursive


def test_detect_skips_hidden_files_and_says_what_it_skipped(capsys, caplog, tiny_checkpoint_dir, archive):
    caplog.set_level(logging.INFO, logger="rine.cli.detect")
    code, out, err = detect(capsys, tiny_checkpoint_dir, archive)
    assert code == 0, err  # no error record for ._a.png or the hidden folder
    assert [r["path"] for r in records(out)] == [str(archive / "a.png"), str(archive / "sub" / "b.jpg")]
    # counted by reason in the summary (the hidden folder is one entry), listed at -v (INFO)
    assert "6 files skipped: 3 hidden, 1 .heic (HEIC, an unsupported format), " in err
    assert "1 .jp2 (JPEG 2000, an unsupported format), 1 .svg (vector image, not supported)" in err
    for name in ("vector.svg", "sub/phone.heic", "sub/scan.jp2", "._a.png", ".git"):
        assert f"skipped {archive / name}" in caplog.text


def test_an_unsupported_format_named_on_the_command_line_says_what_it_is(capsys, tiny_checkpoint_dir, archive):
    code, out, err = detect(capsys, tiny_checkpoint_dir, archive / "vector.svg", archive / "sub" / "phone.heic",
                            archive / "sub" / "scan.jp2", archive / "._a.png")
    assert code == 1
    errors = [r["error"] for r in records(out)]
    assert errors[0].startswith("an SVG file: vector images are not supported")
    assert errors[1].startswith("a HEIC/HEIF file, an unsupported format")
    assert errors[2].startswith("a JPEG 2000 file, an unsupported format")
    assert errors[3].startswith("not an image in a supported format")  # named: decoded, and refused
    assert "4 of 4 inputs could not be scored" in err


def test_the_summary_counts_one_skipped_file_in_the_singular():
    skipped = Skipped()
    skipped.add("x.txt", ".txt")
    assert skipped.summary() == "1 file skipped: 1 .txt"


# ---------------------------------------------------------------------- 7: duplicates
def test_overlapping_inputs_are_scored_once_in_first_seen_order(capsys, tiny_checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "d" / "a.png", (40, 40), seed=1)
    write_image(tmp_path / "d" / "b.png", (40, 40), seed=2)
    write_image(tmp_path / "c.png", (40, 40), seed=3)
    code, out, err = detect(capsys, tiny_checkpoint_dir, "c.png", "d", "d/b.png", "./d/a.png", tmp_path / "c.png")
    assert code == 0, err
    assert [r["path"] for r in records(out)] == ["c.png", "d/a.png", "d/b.png"]
    assert "3 duplicate inputs dropped" in err


def test_a_folder_given_twice_that_cannot_be_listed_is_one_record(capsys, tiny_checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = detect(capsys, tiny_checkpoint_dir, "gone/*.png", "./gone/*.png", "gone/*.png")
    assert code == 1
    # 10: a glob that matches nothing says so (it is not a missing file)
    assert [(r["path"], r["error"]) for r in records(out)] == [("gone/*.png", "no file matches this pattern")]
    assert "1 of 1 input could not be scored" in err


# ---------------------------------------------------------------------- 4: 16-bit pixels
def png_48bit(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG [H, W, 3] uint16 (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_grey_is_scaled_as_pillow_scales_16bit_rgb():
    # values around each high-byte step, where a rounding (v / 257) or a clip (min(v, 255)) differ
    v = np.array([0, 255, 256, 383, 384, 511, 4095, 32767, 32768, 32896, 65279, 65280, 65535] * 2, dtype=np.uint16)
    grey = v.reshape(2, -1)
    rgb_path = np.asarray(load_image(png_48bit(np.stack([grey] * 3, axis=-1))))
    assert np.array_equal(rgb_path[..., 0], grey >> 8)  # what Pillow does for 48-bit RGB: the high byte
    for mode, fmt in (("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")):
        buf = io.BytesIO()
        Image.frombytes(mode, grey.shape[::-1], grey.astype(">u2" if mode == "I;16B" else "<u2").tobytes()).save(
            buf, format=fmt)
        assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
        assert np.array_equal(np.asarray(load_image(buf.getvalue())), rgb_path), (mode, fmt)


@pytest.mark.parametrize("mode, why", [("F", "floating-point"), ("I", "32-bit integer")])
def test_float_and_32bit_images_are_refused_with_a_reason(mode, why):
    image = Image.fromarray(np.full((4, 4), 1000, np.float32 if mode == "F" else np.int32), mode)
    with pytest.raises(ImageLoadError, match=why) as e:
        load_image(image)
    assert e.value.kind == "bad_mode"


# ---------------------------------------------------------------------- 5, 6: one-class sets, partial means
def test_acc_best_of_a_one_class_set_is_undefined_and_left_out_of_the_mean():
    one_class = compute_metrics([0, 0, 0], [0.9, 0.8, 0.1])  # acc 1/3: a threshold above 0.9 makes it 100 %
    assert one_class["acc_best"] is None and "acc_best" in one_class["notes"][0]
    two_class = compute_metrics([0, 0, 1, 1], [0.1, 0.7, 0.6, 0.9])
    assert two_class["acc_best"] == pytest.approx(0.75)
    mean = mean_metrics({"a": two_class, "b": one_class})
    assert mean["acc_best"] == pytest.approx(0.75) and mean["n_sets_acc_best"] == 1


def _run(block_importance=None) -> RunResult:
    recs = {"mixed": [{"label": y, "prob_fake": p, "error": None} for y, p in
                      [(0, 0.1), (0, 0.7), (1, 0.6), (1, 0.9), (1, 0.8)]],
            "realonly": [{"label": 0, "prob_fake": p, "error": None} for p in (0.2, 0.3)]}
    return RunResult("tiny", Condition(), recs, metrics_of(recs), block_importance)


def test_tables_mark_undefined_cells_and_partial_means():
    from rine.evaluation.outputs import detail_table_markdown, paper_table_markdown

    run = _run()
    paper = paper_table_markdown([run], ["mixed", "realonly"])
    row = next(line for line in paper.splitlines() if line.startswith("| tiny"))
    ap_mixed = 100 * run.metrics["sets"]["mixed"]["ap"]
    assert row == f"| tiny | 80.0 / {ap_mixed:.1f} | 100.0 / n/a | 90.0 / {ap_mixed:.1f} (1 of 2 sets) |"
    assert "Partial means: ap over 1 of 2 sets" in paper
    detail = detail_table_markdown(run)
    mean_row = next(line for line in detail.splitlines() if line.startswith("| mean"))
    assert "(1 of 2 sets)" in mean_row and "acc_best over 1 of 2" in detail


def test_eval_summary_line_says_over_how_many_sets_each_mean_is(capsys, tmp_path, tiny_checkpoint_dir):
    root = tmp_path / "bench"
    for i, folder in enumerate(("two/0_real", "two/1_fake", "onlyreal/0_real")):
        write_image(root / folder / "x.png", (40, 40), seed=i)
    (root / "onlyreal" / "0_real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = run_cli(capsys, "eval", "--suite", "folder", "--root", str(root), "--out", str(tmp_path / "o"),
                           "--model", str(tiny_checkpoint_dir), "--no-progress", "--no-plots")
    assert code == 0, err
    assert "(1 of 2 sets), 2 test sets" in err and "AP " in err
    assert "rine: 1 image could not be read" in err


# ---------------------------------------------------------------------- 8: plots
def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_acc_ap_plot_keeps_its_legend_off_the_bars_and_marks_undefined_values():
    from matplotlib.patches import Rectangle

    from rine.evaluation.plots import acc_ap_figure

    fig = acc_ap_figure(_run())
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]
    assert len(bars) == 5  # 3 ACC, 2 AP: the AP of the one-class set has no bar
    assert not any(_overlaps(legend, bar.get_window_extent()) for bar in bars)
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    assert ax.get_xticklabels()[-1].get_text() == "mean\n(AP: 1 of 2 sets)"


def test_roc_plot_gives_set_sizes_and_names_the_sets_left_out():
    from rine.evaluation.plots import roc_figure

    fig = roc_figure(_run())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"mixed ({100 * _run().metrics['sets']['mixed']['auc']:.1f}; 2/3)"]
    assert any("left out (one class only, no ROC): realonly" in t.get_text() for t in fig.texts)


def test_block_importance_axis_has_whole_block_numbers():
    from rine.evaluation.plots import block_importance_figure

    ticks = block_importance_figure([0.2, 0.5, 0.3]).axes[0].get_xticks()
    assert list(ticks) == [1, 2, 3]


# ---------------------------------------------------------------------- 1: workers die with their parent
def _children() -> dict[int, list[int]]:
    """{ppid: [pid]} of the live processes (zombies are dead: they only wait to be reaped)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if state != "Z":
                out.setdefault(int(ppid), []).append(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _read_to_eof(stream, seconds: float) -> bool:
    """Whether `stream` reaches end of file within `seconds` (a liveness bound, not a timing)."""
    done = threading.Event()
    threading.Thread(target=lambda: (stream.read(), done.set()), daemon=True).start()
    return done.wait(seconds)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_decoding_workers_die_with_a_killed_parent(tmp_path, how):
    """Killing the process that runs a process pool (kill -9, the out-of-memory killer, or a
    SIGTERM it does not handle) leaves no forkserver, worker or resource tracker behind, and
    whoever reads its output gets end of file (`rine detect ... | cat` ends)."""
    script = tmp_path / "pool_owner.py"
    script.write_text(
        "import itertools, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from rine.data.decoding import ordered_map\n"
        "from support import archives_jobs\n"
        "if __name__ == '__main__':\n"
        "    jobs = ((i, (i,)) for i in itertools.count())\n"
        "    for _, pid, _ in ordered_map(archives_jobs.pid_slowly, jobs, kind='processes', workers=2, max_in_flight=4):\n"
        "        print(pid, flush=True)\n",
        encoding="utf-8",
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        workers = {int(owner.stdout.readline()) for _ in range(40)}
        assert len(workers) == 2
        left = _descendants(owner.pid)  # forkserver, resource tracker, workers
        assert workers <= left and len(left) >= 4
        owner.send_signal(how)
        owner.wait(timeout=60)
        assert _read_to_eof(owner.stdout, 60) and _read_to_eof(owner.stderr, 60)  # hung here before
        # Every holder of the pipe has closed it; each process left ends (or is a zombie) soon after.
        deadline = time.monotonic() + 30
        while (alive := left & set().union(*_children().values())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in alive}
    finally:
        for pid in _descendants(owner.pid) | ({owner.pid} if owner.poll() is None else set()):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_stops_detect_as_ctrl_c_does(tmp_path, tiny_checkpoint_dir):
    """SIGTERM in the middle of `rine detect --decoder processes`: the records written are
    kept, the resume hint is printed, the workers are stopped and the output pipes end."""
    images = [str(write_image(tmp_path / f"img{i}.png", (60, 60), seed=i)) for i in range(4)]
    out = tmp_path / "scores.jsonl"
    script = tmp_path / "terminated.py"
    script.write_text(
        "import os, signal, sys\n"
        "from rine.cli import main\n"
        "from rine.inference.detector import Detector\n"
        "real = Detector.predict_iter\n"
        "def one_then_sigterm(self, *a, **k):\n"
        "    stream = real(self, *a, **k)\n"
        "    yield next(stream)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, with workers running\n"
        "    yield from stream\n"
        "Detector.predict_iter = one_then_sigterm\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8",
    )
    argv = [sys.executable, str(script), "detect", *images, "--model", str(tiny_checkpoint_dir), "-o", str(out),
            "--decoder", "processes", "--workers", "2", "--batch-size", "1", "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "1 of 4 records written" in done.stderr and "--resume" in done.stderr
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == images[:1]


# ---------------------------------------------------------------------- 9: serve logs each request
def test_each_request_is_logged_once_without_key_or_content(tiny_detector, caplog):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.server.app import create_app
    from rine.server.limits import ServerSettings

    caplog.set_level(logging.INFO, logger="rine.server.access")
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(buf, format="PNG")
    files = [("files", (f"secret-name-{i}.png", buf.getvalue(), "image/png")) for i in range(2)]
    with TestClient(create_app(tiny_detector, ServerSettings(api_key="key-s3cret"))) as client:
        caplog.clear()
        assert client.post("/v1/detect", files=files, headers={"X-API-Key": "key-s3cret"}).status_code == 200
        assert client.post("/v1/detect", files=files[:1]).status_code == 401
        assert client.get("/healthz?token=abc").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "rine.server.access"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("testclient POST /v1/detect 200 2 images ") and lines[0].endswith(" ms")
    assert lines[1].startswith("testclient POST /v1/detect 401 ")  # refused before the body is read
    assert lines[2].startswith("testclient GET /healthz 200 ")
    assert not any(s in caplog.text for s in ("key-s3cret", "secret-name", "token", "PNG"))


@pytest.mark.parametrize("flag, level", [((), logging.INFO), (("--no-access-log",), logging.WARNING)])
def test_rine_serve_logs_requests_by_default(monkeypatch, flag, level):
    """Without -v (uvicorn at warning level): the access log is on unless --no-access-log."""
    uvicorn = pytest.importorskip("uvicorn")
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config))
    access = logging.getLogger("rine.server.access")
    monkeypatch.setattr(access, "level", access.level)  # restored after the test
    assert main(["serve", "--port", "0", *flag]) == 0
    assert access.getEffectiveLevel() == level and access.isEnabledFor(logging.INFO) == (not flag)
    assert seen["config"].access_log is False  # one line per request: rine's, not also uvicorn's


@pytest.mark.slow
def test_sigterm_answers_the_uploads_in_flight_and_exits_cleanly(tiny_checkpoint_dir):
    """`rine serve` stopped with SIGTERM while uploads are half sent: each gets a complete
    answer (200, or 503), and the server exits with status 0."""
    pytest.importorskip("uvicorn")
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rine", "serve", "--port", str(port), "--model",
                             str(tiny_checkpoint_dir), "--no-access-log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40, 3), 90, np.uint8)).save(buf, format="PNG")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
            + buf.getvalue() + b"\r\n--b--\r\n")
    head = (b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    gate, answers = threading.Event(), []

    def half_then_rest() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + body[: len(body) // 2])
            gate.wait(60)
            sock.sendall(body[len(body) // 2 :])
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        answers.append(data)

    try:
        deadline = time.monotonic() + 120
        wait_ready(base, proc, 120)
        clients = [threading.Thread(target=half_then_rest) for _ in range(4)]
        for c in clients:
            c.start()
        while httpx.get(f"{base}/readyz", timeout=10).json()["in_flight"] < 4:
            assert time.monotonic() < deadline, "uploads not in flight"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # shutting down, the bodies half sent
        gate.set()
        for c in clients:
            c.join(60)
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]  # was -15: uvicorn re-raised SIGTERM
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
    assert len(answers) == 4
    for data in answers:
        status = int(data[9:12])
        assert status in (200, 503), data[:300]
        head_end = data.index(b"\r\n\r\n")
        assert status != 200 or json.loads(data[head_end + 4 :])["results"][0]["name"] == "a.png"  # complete
    assert b"stopped by SIGTERM" in proc.stderr.read()
