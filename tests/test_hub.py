"""Parquet image datasets and the Hub (datasets and detectors), against tiny datasets the
tests write in each benchmark's schema and a loopback Hub (tests/support/loopback_hub.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rine.cli import main

from conftest import REPO
from support.loopback_hub import LoopbackHub
from support.parquet_data import write_commfor, write_custom, write_opensdi

pytest.importorskip("pyarrow")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def opensdi(tmp_path_factory):
    """sd15 in two files (5 + 4 rows, row 2 of the first corrupt), sd2 in one (6 rows);
    row groups of 3 rows, so files span several groups."""
    root = tmp_path_factory.mktemp("opensdi") / "OpenSDI_test"
    rows = write_opensdi(root, {"sd15": [5, 4], "sd2": [6]}, corrupt={"sd15": {2}})
    return root, rows


def _eval(args: list[str], out: Path, model: Path) -> int:
    return main(["eval", *args, "--out", str(out), "--model", str(model), "--no-plots", "--no-progress",
                 "--workers", "2"])


def _centred_checkpoint(checkpoint: Path, logits: list[float], folder: Path) -> Path:
    """The checkpoint with its last bias moved so that a third of the given logits fall
    below 0: predictions of both classes, so that F1, accuracy and their averages are
    sensitive (a random tiny head calls every image fake)."""
    import torch

    from rine.model.checkpoints import load_pretrained, save_pretrained

    head, config = load_pretrained(checkpoint)
    last = [m for m in head.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias -= sorted(logits)[len(logits) // 3]
    save_pretrained(head, config, folder)
    return folder


def test_opensdi_local_folder_counts_metrics_and_leaderboard(opensdi, tiny_checkpoint_dir, tmp_path, capsys):
    root, rows = opensdi
    first = tmp_path / "first"
    assert _eval(["--suite", "opensdi", "--root", str(root)], first, tiny_checkpoint_dir) == 0
    model = _centred_checkpoint(tiny_checkpoint_dir, [r["logit"] for r in _records(first) if r["error"] is None],
                                tmp_path / "centred")
    out = tmp_path / "run"
    assert _eval(["--suite", "opensdi", "--root", str(root)], out, model) == 0
    recs = _records(out)
    # one record per row, per split, with the dataset's own key and file#row as identity
    for split, split_rows in rows.items():
        got = [r for r in recs if r["set"] == split]
        assert len(got) == len(split_rows)
        assert [r["row_key"] for r in got] == [row["key"] for row in split_rows]
        assert [r["label"] for r in got] == [row["label"] for row in split_rows]
    bad = [r for r in recs if r["error"] is not None]
    assert len(bad) == 1 and bad[0]["row_key"] == "sd15_00002"
    assert bad[0]["path"] == f"{root}/sd15/data/sd15-00000-of-00002.parquet#2" and "corrupt" in bad[0]["error"]
    second_file = [r for r in recs if "sd15-00001-of-00002" in r["path"]]
    assert [r["path"].rsplit("#", 1)[1] for r in second_file] == ["0", "1", "2", "3"]  # row within its file

    metrics = json.loads((out / "metrics.json").read_text())
    sets = metrics["sets"] if "sets" in metrics else metrics["runs"][0]["metrics"]["sets"]
    board = (out / "leaderboard.md").read_text()
    header, _, *lines = board.strip().splitlines()
    assert header == "| Method | SD1.5 F1 | SD1.5 Acc | SD2.1 F1 | SD2.1 Acc | AVG F1 | AVG Acc |"
    cells = lines[0].strip("|").split("|")
    f1s, accs = [], []
    for split in ("sd15", "sd2"):
        ok = [r for r in recs if r["set"] == split and r["error"] is None]
        y, pred = [r["label"] for r in ok], [int(r["prob_fake"] > 0.5) for r in ok]
        f1s.append(sk_metrics.f1_score(y, pred, zero_division=0))
        accs.append(sk_metrics.accuracy_score(y, pred))
        assert sets[split]["acc"] == pytest.approx(accs[-1], abs=1e-12)
        assert sets[split]["n_real"] + sets[split]["n_fake"] + sets[split]["n_errors"] == len(rows[split])
    assert len({round(v, 4) for v in f1s}) == 2 and len({round(v, 4) for v in accs}) == 2  # the test can tell
    assert 0 < sum(int(r["prob_fake"] > 0.5) for r in recs if r["error"] is None) < len(recs) - 1
    expected = [f"{v:.4f}" for pair in zip(f1s, accs, strict=True) for v in pair]
    expected += [f"{sum(f1s) / 2:.4f}", f"{sum(accs) / 2:.4f}"]  # unweighted over the splits
    assert [c.strip() for c in cells[1:]] == expected
    err = capsys.readouterr().err
    assert "sdxl" in err  # the splits absent from the folder are named


def test_commfor_schema_one_set_per_generator(tmp_path, tiny_checkpoint_dir):
    root = tmp_path / "cf"
    gens = {"sd-turbo": (3, 4), "dalle-mini": (2, 2), "real-only": (3, 0)}
    rows = write_commfor(root, gens, files=2)
    out = tmp_path / "run"
    assert _eval(["--suite", "commfor", "--root", str(root)], out, tiny_checkpoint_dir) == 0
    recs = _records(out)
    assert len(recs) == len(rows)
    for gen, (n_real, n_fake) in gens.items():
        got = [r for r in recs if r["set"] == gen]
        assert (sum(r["label"] == 0 for r in got), sum(r["label"] == 1 for r in got)) == (n_real, n_fake)
    assert all(r["error"] is None for r in recs)


def test_column_mapped_custom_schema_with_paths(tmp_path, tiny_checkpoint_dir):
    root = tmp_path / "custom"
    rows = write_custom(root, 8)
    out = tmp_path / "run"
    code = _eval(["--suite", "parquet", "--root", str(root), "--image-column", "picture", "--label-column", "verdict",
                  "--label-map", "authentic=0,synthetic=1", "--set-column", "gen"], out, tiny_checkpoint_dir)
    assert code == 0
    recs = _records(out)
    assert len(recs) == len(rows)
    assert [r["label"] for r in recs if r["set"] == "alpha"] == [int(row["verdict"] == "synthetic") for row in rows
                                                                  if row["gen"] == "alpha"]
    outside = [r for r in recs if r["path"].endswith(f"#{len(rows) - 1}")]
    assert len(outside) == 1 and "outside the dataset folder" in outside[0]["error"]
    # rows holding a path (odd rows) are read from the file beside the dataset, as those holding bytes
    assert all(r["error"] is None for r in recs if r is not outside[0])


def test_chameleon_table_is_balanced_accuracy(tmp_path, tiny_checkpoint_dir):
    from conftest import write_image

    root = tmp_path / "Chameleon" / "test"
    for i in range(6):
        write_image(root / "0_real" / f"r{i}.png", size=(40 + i, 40), seed=i)
    for i in range(2):
        write_image(root / "1_fake" / f"f{i}.png", size=(40, 40 + i), seed=10 + i)
    out = tmp_path / "run"
    assert _eval(["--suite", "chameleon", "--root", str(root)], out, tiny_checkpoint_dir) == 0
    recs = _records(out)
    y, pred = [r["label"] for r in recs], [int(r["prob_fake"] > 0.5) for r in recs]
    header, _, row = (out / "balanced.md").read_text().strip().splitlines()
    assert header.startswith("| Method | Set | Real | Fake | Balanced Acc | Acc |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["6", "2"]
    assert cells[4] == f"{sk_metrics.balanced_accuracy_score(y, pred):.4f}"
    assert cells[5] == f"{sk_metrics.accuracy_score(y, pred):.4f}"


def test_label_that_cannot_be_mapped_stops_naming_file_and_row(tmp_path, tiny_checkpoint_dir, capsys):
    root = tmp_path / "custom"
    write_custom(root, 4)
    code = _eval(["--suite", "parquet", "--root", str(root), "--image-column", "picture", "--label-column", "verdict"],
                 tmp_path / "run", tiny_checkpoint_dir)
    assert code == 2
    err = capsys.readouterr().err
    assert "part-0.parquet#0" in err and "--label-map" in err


def test_extract_reads_parquet_rows(opensdi, tiny_backbone_dir, tmp_path):
    root, rows = opensdi
    store = tmp_path / "store"
    code = main(["extract", "--layout", "parquet", "--root", str(root), "--splits", "sd15", "--backbone",
                 str(tiny_backbone_dir), "--transform", "train", "--out", str(store), "--no-progress"])
    assert code == 1  # one unreadable row: reported, the rest stored
    from rine.data.tap_store import FeatureStore

    fs = FeatureStore.open(store)
    assert fs.meta["n_items"] == len(rows["sd15"])
    assert len(fs.errors) == 1 and fs.errors[0][0].endswith("sd15/data/sd15-00000-of-00002.parquet#2")
    assert len(fs) == len(rows["sd15"]) - 1


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The loopback Hub as huggingface_hub's endpoint, in this process, a fresh cache."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("RINE_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
    with LoopbackHub() as h:
        monkeypatch.setattr(hf_constants, "ENDPOINT", h.url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        yield h


def _go_offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_hub_dataset_downloads_only_the_splits_asked_for(opensdi, hub, tiny_checkpoint_dir, tmp_path, monkeypatch):
    root, rows = opensdi
    hub.add_dataset_folder("nebula/OpenSDI_test", root)
    out = tmp_path / "hub-run"
    assert _eval(["--suite", "opensdi", "--hub", "nebula/OpenSDI_test", "--sets", "sd2"], out, tiny_checkpoint_dir) == 0
    fetched = [r for r in hub.requests if r.startswith("GET /datasets/") and r.endswith(".parquet")]
    assert fetched and all("/data/sd2-" in r for r in fetched), hub.requests  # sd15 never downloaded
    recs = _records(out)
    assert [r["row_key"] for r in recs] == [row["key"] for row in rows["sd2"]]
    assert recs[0]["path"] == "nebula/OpenSDI_test/sd2/data/sd2-00000-of-00001.parquet#0"
    # the same records as from the local folder (identity aside): same rows, same scores
    local = tmp_path / "local-run"
    assert _eval(["--suite", "opensdi", "--root", str(root), "--sets", "sd2"], local, tiny_checkpoint_dir) == 0
    def rows_and_scores(records, dataset):
        return [(r["path"].removeprefix(dataset + "/"), r["row_key"], r["prob_fake"]) for r in records]

    assert rows_and_scores(_records(local), str(root)) == rows_and_scores(recs, "nebula/OpenSDI_test")

    # offline: the cached split is found without the network, the other one is named as missing
    _go_offline(monkeypatch)
    n = len(hub.requests)
    again = tmp_path / "offline-run"
    assert _eval(["--suite", "opensdi", "--hub", "nebula/OpenSDI_test", "--sets", "sd2"], again, tiny_checkpoint_dir) == 0
    assert len(hub.requests) == n
    assert [r["prob_fake"] for r in _records(again)] == [r["prob_fake"] for r in recs]
    # ... and a split that was never downloaded is named, with the local way
    assert _eval(["--suite", "opensdi", "--hub", "nebula/OpenSDI_test", "--sets", "sd15"], tmp_path / "o2",
                 tiny_checkpoint_dir) == 2
    assert len(hub.requests) == n


def test_hub_dataset_offline_and_uncached_names_what_is_missing(hub, tiny_checkpoint_dir, tmp_path, monkeypatch, capsys):
    _go_offline(monkeypatch)
    code = _eval(["--suite", "opensdi", "--hub", "nebula/OpenSDI_test", "--sets", "sd15"], tmp_path / "o",
                 tiny_checkpoint_dir)
    assert code == 2
    err = capsys.readouterr().err
    assert "nebula/OpenSDI_test" in err and "sd15" in err and "offline" in err
    assert "--root DIR" in err and "--repo-type dataset" in err
    assert hub.requests == []


MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import pyarrow  # noqa: F401  (imported before the baseline: its own size is not the reader's)
    from rine.data.parquet import ParquetColumns, read_parquet_dataset
    path = Path(sys.argv[1])
    (ts,) = read_parquet_dataset({"s": [path]}, name="m", root=path.parent, columns=ParquetColumns(image="blob"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = sum(len(b) for b in ts.source.iter_images())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(ts.items), total, (after - before) * 1024)
    """
)


def _write_blobs(path: Path, groups: int, rows_per_group: int = 8, size: int = 256 * 1024) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("blob", pa.binary()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none") as w:
        for _ in range(groups):
            blobs = [rng.bytes(size) for _k in range(rows_per_group)]  # incompressible
            w.write_table(pa.table({"blob": blobs, "label": [i % 2 for i in range(rows_per_group)]}, schema=schema))
    return path.stat().st_size


def test_peak_memory_is_flat_in_the_file_size(tmp_path):
    """A file of 4 row groups and one of 48 (2 MiB each): the reader's peak (measured in a
    child process) grows by far less than the 88 MiB between them."""
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    sizes = {small: _write_blobs(small, 4), large: _write_blobs(large, 48)}
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    peaks = {}
    for path in (small, large):
        res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], capture_output=True, text=True,
                             timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        n, total, peak = map(int, res.stdout.split())
        assert n == 8 * (4 if path is small else 48) and total == n * 256 * 1024  # every row read, whole
        peaks[path] = peak
    grown = peaks[large] - peaks[small]
    assert grown < (sizes[large] - sizes[small]) / 4, (peaks, sizes)


def _detect(model: str, images: list[str], capsys, *extra: str) -> list[dict]:
    capsys.readouterr()
    assert main(["detect", *images, "--model", model, "--format", "json", "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_push_then_detect_from_the_hub_gives_the_local_records(opensdi, hub, tiny_checkpoint_dir, tmp_path, capsys):
    from conftest import write_image

    root, _ = opensdi
    run = tmp_path / "eval"
    assert _eval(["--suite", "opensdi", "--root", str(root)], run, tiny_checkpoint_dir) == 0
    assert main(["push", str(tiny_checkpoint_dir), "user/rine-tiny", "--eval", str(run)]) == 0, hub.requests
    files = hub.repos["user/rine-tiny"]
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert files["model.safetensors"] == (tiny_checkpoint_dir / "model.safetensors").read_bytes()
    assert hub.tokens and all(t == "Bearer hf_loopback_token" for t in hub.tokens)
    card = files["README.md"].decode()
    board = (run / "leaderboard.md").read_text().strip()
    assert board in card  # the eval table, as rine eval wrote it
    assert "| Method | SD1.5 F1 |" in card and "rine detect --model user/rine-tiny" in card
    assert "Licences" in card and "apache-2.0" in card

    images = [str(write_image(tmp_path / f"img{i}.png", seed=i)) for i in range(3)]
    local = _detect(str(tiny_checkpoint_dir), images, capsys)
    remote = _detect("user/rine-tiny", images, capsys)
    assert remote == local
    assert any(r.startswith("GET /user/rine-tiny/resolve/") and r.endswith("model.safetensors") for r in hub.requests)

    # pinned to the pushed commit, then from the cache with the Hub offline
    commit = hub.commits["user/rine-tiny"]
    from rine.inference.detector import Detector

    det = Detector.from_pretrained("user/rine-tiny", revision=commit, device="cpu")
    assert [p.prob_fake for p in det.predict(images)] == [r["prob_fake"] for r in local]


def test_hub_model_offline_and_uncached_names_what_is_missing(hub, monkeypatch, tmp_path, capsys):
    from conftest import write_image

    _go_offline(monkeypatch)
    image = str(write_image(tmp_path / "x.png"))
    assert main(["detect", image, "--model", "user/never-pushed", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "user/never-pushed" in err and "offline" in err and "--model DIR" in err
    assert hub.requests == []


def test_push_refuses_a_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "user/x"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_official_head_from_sidbench_when_github_is_unreachable(hub, monkeypatch):
    """The second source serves the same file, verified by the same blob id; a tampered
    copy there is refused as from GitHub."""
    from rine.model.checkpoints import load_pretrained
    from rine.model.pretrained import WeightsUnavailableError, resolve_pretrained

    from conftest import OFFICIAL

    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/nothing-here")
    monkeypatch.setenv("RINE_SIDBENCH_BASE_URL", f"{hub.url}/dkarageo/sidbench/resolve/main/rine")
    hub._set_repo("dkarageo/sidbench", {"rine/model_2class_trainable.pth": b"tampered"})
    with pytest.raises(WeightsUnavailableError, match="git blob id"):
        resolve_pretrained("rine-vitl14-2class")
    hub._set_repo("dkarageo/sidbench", {"rine/model_2class_trainable.pth":
                                        (OFFICIAL / "model_2class_trainable.pth").read_bytes()})
    _, config = load_pretrained(resolve_pretrained("rine-vitl14-2class"))
    assert config.meta["source"].endswith("/dkarageo/sidbench/resolve/main/rine/model_2class_trainable.pth")
    assert config.meta["head_blob_sha1"] == "b8418b5884fd1fc1dba79bea91f41ab2341673d8"


def test_process_decoders_get_the_same_rows_and_errors(opensdi, tiny_checkpoint_dir, tmp_path):
    """Parquet bytes and RowErrors cross to decoding processes (the GPU default) intact."""
    root, _ = opensdi
    outs = {}
    for decoder in ("threads", "processes"):
        out = tmp_path / decoder
        assert _eval(["--suite", "opensdi", "--root", str(root), "--sets", "sd15", "--decoder", decoder], out,
                     tiny_checkpoint_dir) == 0
        outs[decoder] = [(r["path"], r["prob_fake"], r["error"]) for r in _records(out)]
    assert outs["processes"] == outs["threads"]
    assert sum(e is not None for _, _, e in outs["processes"]) == 1


def test_every_slice_of_rows_streams_the_same_images(opensdi):
    """iter_images(start, stop) (what each extraction shard reads) equals the slice of the
    whole stream, across files and row-group boundaries; RowErrors in place."""
    from rine.data.layouts import read_layout

    root, rows = opensdi
    (ts,) = read_layout("opensdi", root, sets=["sd15"]).sets
    full = list(ts.source.iter_images())
    assert len(full) == len(rows["sd15"])
    assert full[0] == rows["sd15"][0]["image"]["bytes"] and full[2] == rows["sd15"][2]["image"]["bytes"]
    for start in range(len(full)):
        for stop in range(start, len(full) + 1):
            assert list(ts.source.iter_images(start, stop)) == full[start:stop], (start, stop)


def test_splits_come_from_the_card_when_it_names_them(tmp_path):
    from rine.data.hub import split_files

    write_opensdi(tmp_path, {"sd15": [2], "sd2": [2]}, card=False)
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert set(split_files(tmp_path)) == {"sd15", "sd2"}  # no card: from the file names
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: old\n    path: data/sd15-*\n"
        "  - split: new\n    path:\n    - data/sd2-*\n---\n", encoding="utf-8")
    found = split_files(tmp_path)
    assert {k: [p.name for p in v] for k, v in found.items()} == {"old": [names[0]], "new": [names[1]]}
    with pytest.raises(ValueError, match=r"split\(s\) \['sd15'\] not found .* it has: old, new"):
        split_files(tmp_path, ["sd15"])
