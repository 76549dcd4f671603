"""`rine batch` on a local Ray cluster: records equal `rine detect`'s, decoding and scoring are
separate operators, nothing lost and nothing twice (a decoder killed by a file, a killed
actor, a killed driver then rerun, a rerun of a finished job), and `--taps` stores that train
to the same weights as `rine extract`'s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from support.ray_cluster import images as _images
from support.ray_cluster import kill_cluster as _kill_cluster
from support.ray_cluster import records as _records
from support.ray_cluster import worker_env as _worker_env

S3_BUCKET = "rine-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A loopback S3 (moto's server) and the environment that points pyarrow's S3 file system
    at it (AWS_ENDPOINT_URL and dummy keys); the cluster's workers inherit it."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=S3_BUCKET)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def _s3_put(endpoint: str, key: str, data: bytes) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=S3_BUCKET, Key=key, Body=data)
    return f"s3://{S3_BUCKET}/{key}"


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "RINE_TEST_KILL_DIR", "RINE_TEST_CLUSTER")}
    os.environ.update({**_worker_env(), "RINE_TEST_KILL_DIR": temp, "RINE_TEST_CLUSTER": temp})
    ray.init(num_cpus=4, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().execution_no_progress_timeout_s = 60
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        _kill_cluster(temp)  # after ray.shutdown(), only stragglers (this process no longer names it)
        shutil.rmtree(temp, ignore_errors=True)


def _cfg(inputs, out, model, **kw):
    from rine.cluster.job import BatchConfig

    kw.setdefault("shard_size", 4)
    kw.setdefault("batch_size", 3)
    kw.setdefault("decode_batch", 4)
    return BatchConfig(inputs=[str(i) for i in inputs], out=str(out), model=str(model), precision="fp32",
                       progress=False, stall_timeout=60, **kw)


# --------------------------------------------------------------------------- no cluster


def test_without_ray_it_says_how_to_install(tmp_path, monkeypatch, capsys):
    from rine.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    write_image(tmp_path / "a.png")
    assert main(["batch", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'rine[cluster]'" in capsys.readouterr().err


def test_input_list_from_folders_and_manifests(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from rine.cluster.manifest import ManifestError, list_inputs

    imgs = _images(tmp_path / "d", 2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.csv").write_text("path,label,set\n../d/img00.png,1,2024\n/abs/x.jpg,0,b\n")
    (tmp_path / "m" / "list.jsonl").write_text('{"path": "file:///data/y.png", "label": 1}\n')
    pq.write_table(pa.table({"path": ["z.png"]}), tmp_path / "m" / "list.parquet")
    got = list_inputs([str(tmp_path / "d"), str(tmp_path / "m" / "list.csv"), str(tmp_path / "m" / "list.jsonl"),
                       str(tmp_path / "m" / "list.parquet")]).table.to_pylist()
    assert [r["item"] for r in got] == list(range(6))
    assert [r["path"] for r in got] == [str(p) for p in imgs] + ["../d/img00.png", "/abs/x.jpg", "file:///data/y.png", "z.png"]
    # relative manifest paths are read relative to the manifest; URIs and absolute paths as they are
    assert got[2]["source"] == os.fsencode(tmp_path / "m" / "../d/img00.png")
    assert [r["source"] for r in got[3:]] == [b"/abs/x.jpg", b"file:///data/y.png", os.fsencode(tmp_path / "m" / "z.png")]
    assert [r["label"] for r in got] == [None, None, 1, 0, 1, None]
    assert got[2]["set"] == "2024"  # a set name that looks like a number stays text
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(ManifestError, match="no `path` column"):
        list_inputs([str(tmp_path / "bad.csv")])


def test_file_names_that_are_not_utf8_are_listed_and_read_back():
    pytest.importorskip("pyarrow")
    from rine.cluster.manifest import display_path, list_inputs, source_path

    folder = Path(tempfile.mkdtemp())
    try:
        raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
        write_image(Path(os.fsdecode(raw)))
        row = list_inputs([str(folder)]).table.to_pylist()[0]
        assert row["source"] == raw and os.path.isfile(source_path(row["source"]))
        assert row["path"] == str(folder) + "/caf\\xe9.png"  # Parquet text is UTF-8: the byte is escaped
        assert display_path("café.png") == "café.png"  # real UTF-8 names stay as they are
    finally:
        shutil.rmtree(folder)


def test_decoding_processes_import_no_torch():
    """Each decoding slot runs a fork server and a worker: with torch imported they hold ~100 MB
    more each (the steady-state memory of a job). The broken variant: a torch import at module
    level in the decode path (rine.data.preprocess once had one)."""
    code = ("import sys\nfrom rine.cluster.job import BatchConfig\nfrom rine.cluster.tasks import DecodeSpec, resolve\n"
            "import importlib\n[importlib.import_module(m) for m in DecodeSpec('score').preload if m != '__main__']\n"
            "resolve(BatchConfig.decode_fn); import rine.data.augment, rine.data.decoding\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **_worker_env()})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_object_store_buffer_is_bounded_by_the_pipeline_not_the_input_list():
    pytest.importorskip("pyarrow")
    from rine.cluster.job import BatchConfig
    from rine.cluster.plan import MIN_BUFFER_BYTES, buffer_bytes, plan_resources
    from rine.cluster.tasks import DecodeSpec
    from rine.config import PreprocessConfig

    cfg = BatchConfig(inputs=[], out="", device="cpu", actor_cpus=1)  # one 1-thread actor, 4 CPUs
    plan = plan_resources(cfg, 0, 4)
    center = DecodeSpec("score", preprocess=PreprocessConfig(image_size=224, crop="center"))
    assert buffer_bytes(cfg, center, plan, 4) == MIN_BUFFER_BYTES  # 6 slots x 2 + 4 blocks of 4.8 MB < the floor
    ten = DecodeSpec("score", preprocess=PreprocessConfig(image_size=224, crop="ten"))
    block = 32 * 10 * 224 * 224 * 3
    assert buffer_bytes(cfg, ten, plan, 4) == block * (2 * 6 + 4)  # (4 - 1) CPUs / 0.5 per task = 6 slots
    gpu = plan_resources(BatchConfig(inputs=[], out="", device="cuda"), 8, 128)  # 8 actors, 64 images a batch
    assert buffer_bytes(BatchConfig(inputs=[], out=""), ten, gpu, 128) == block * (2 * 120 + 4 * 2 * 8)
    assert buffer_bytes(BatchConfig(inputs=[], out="", buffer_mb=64), ten, gpu, 128) == 64 * 2**20
    gpu.decode_tasks = 15  # a local Ray on a 16-core GPU host: decoding capped at the cores the actors leave
    assert buffer_bytes(BatchConfig(inputs=[], out=""), ten, gpu, 128) == block * (2 * 15 + 4 * 2 * 8)


def test_reconcile_finds_missing_and_duplicated_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from rine.cluster.manifest import list_inputs
    from rine.cluster.reconcile import reconcile_parts

    paths = [str(p) for p in _images(tmp_path / "d", 3)]
    inputs = list_inputs(paths)

    def part(k, items, errors=None):
        pq.write_table(pa.table({"path": [paths[i] for i in items], "item": items,
                                 "error": errors or [None] * len(items)}), tmp_path / f"part-{k:06d}.parquet")

    part(0, [0, 1], [None, "corrupt"])
    assert reconcile_parts(tmp_path, inputs).exit_code == 2  # item 2 missing
    part(1, [2])
    rec = reconcile_parts(tmp_path, inputs)
    assert (rec.exit_code, rec.errors, rec.scored) == (1, 1, 2)
    part(2, [1])  # item 1 twice
    rec = reconcile_parts(tmp_path, inputs)
    assert rec.duplicates == [1] and rec.exit_code == 2


def test_ray_client_addresses_are_refused_with_the_way_that_works(tmp_path, capsys):
    """ray:// connects, then Ray Data fails at the first block (measured, ray 2.60): refuse
    before any work, and say what to do instead."""
    pytest.importorskip("ray")
    from rine.cli import main

    write_image(tmp_path / "a.png")
    assert main(["batch", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--address", "ray://10.0.0.1:10001"]) == 2
    err = capsys.readouterr().err
    assert "Ray Client" in err and "ray job submit" in err and "--address auto" in err
    assert not (tmp_path / "o" / "_manifest.json").exists()


def test_a_plan_the_cluster_cannot_run_is_refused_not_left_waiting():
    pytest.importorskip("pyarrow")
    from rine.cluster.job import BatchConfig, BatchError
    from rine.cluster.plan import check_fits, plan_resources

    gpu = plan_resources(BatchConfig(inputs=[], out="", device="cuda", num_gpus=2), 1, 16)
    assert (gpu.actors, gpu.actor_gpus, gpu.actor_cpus) == (2, 1, 1)
    with pytest.raises(BatchError, match="need 2 GPUs, the cluster has 1"):
        check_fits(gpu, 16, 1)
    check_fits(gpu, 16, 2)
    cpu = plan_resources(BatchConfig(inputs=[], out="", device="cpu", actor_cpus=4), 0, 4)
    with pytest.raises(BatchError, match="leave none for decoding"):
        check_fits(cpu, 4, 0)  # Ray would schedule the actor and starve every decoding task
    check_fits(cpu, 5, 0)


# --------------------------------------------------------------------------- local cluster


def test_decoding_and_scoring_are_separate_operators(ray_cluster):
    import pyarrow as pa

    from rine.cluster.job import BatchConfig
    from rine.cluster.plan import build_dataset, optimized_plan, plan_resources
    from rine.cluster.tasks import DecodeSpec, Scorer

    table = pa.table({"item": [0, 1]})
    for threads, gpus in ((1, 0), (2, 0), (None, 2)):
        plan = plan_resources(BatchConfig(inputs=[], out="", actor_cpus=threads), gpus, 4)
        ds = build_dataset(table, DecodeSpec("score"), plan, Scorer, {"model": {}}, 4)
        text = optimized_plan(ds)
        assert "TaskPoolMapOperator[MapBatches(decode_block)]" in text, text
        assert "ActorPoolMapOperator[MapBatches(Scorer)]" in text, text
    assert plan.actors == 2 and plan.actor_gpus == 1  # one actor per GPU


def test_records_equal_rine_detect_with_ten_crop_and_files_that_kill_or_hang_their_decoder(ray_cluster, s3_endpoint,
                                                                                          tiny_checkpoint_dir, tmp_path):
    """One job: ten-crop records equal `Detector.predict`'s (logits within 1e-6, as the mean
    view logit), error texts identical, a file that kills its decoding process and one that
    hangs it are one error record each, manifest labels/sets are carried, and file:// and
    s3:// URIs (a loopback S3: an object, a missing key, a prefix listed as a folder) are
    read through pyarrow by the decoding tasks."""
    import torch

    from rine.cluster.batch import run_batch
    from rine.cluster.job import MANIFEST_NAME
    from rine.data.decoding import DecoderCrashed, DecoderTimedOut
    from rine.inference.detector import Detector

    imgs = _images(tmp_path / "imgs", 7)
    poison = write_image(tmp_path / "imgs" / "kills-worker.png", seed=50)
    hangs = write_image(tmp_path / "imgs" / "hangs.png", seed=51)
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path / "imgs") + b"/\xe9t\xe9.png"))  # a name that is not UTF-8
    write_image(latin1, seed=52)
    s3_img = _s3_put(s3_endpoint, "up/img03.png", imgs[3].read_bytes())
    s3_dir = _s3_put(s3_endpoint, "day/a/img04.png", imgs[4].read_bytes()).rsplit("/", 2)[0] + "/"
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label,set\nfile://{imgs[0]},1,uri\n{tmp_path / 'missing.png'},0,gone\n"
                        f"file://{tmp_path / 'missing.png'},0,gone\n{s3_img},1,s3\ns3://{S3_BUCKET}/no/such.png,0,s3\n")
    out = tmp_path / "out"
    result = run_batch(_cfg([tmp_path / "imgs", manifest, s3_dir], out, tiny_checkpoint_dir, crop="ten",
                            decode_timeout=10, decode_fn="support.batch_jobs:prepare_views_or_die"))
    rows = _records(out)
    assert result.error is None and result.exit_code == 1  # error records, all there
    assert sorted(r["item"] for r in rows) == list(range(18))
    from ray.data import DataContext

    from rine.cluster.manifest import display_path
    from rine.data.decoding import DecodeOptions

    # the decoded views the object store may hold are bounded (buffer_bytes), not Ray's default
    assert DataContext.get_current().execution_options.resource_limits.object_store_memory == 128 * 2**20

    det = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32", crop="ten")
    by_path = {r["path"]: r for r in rows}
    by_path[str(latin1)] = by_path[display_path(str(latin1))]
    others = [str(p) for p in sorted((tmp_path / "imgs").iterdir()) if p not in (poison, hangs)]
    expected = det.predict(others + [str(tmp_path / "missing.png")], decode=DecodeOptions(decoder="threads"))
    for pred in expected:
        rec = by_path[pred.path]
        assert (rec["error"], rec["error_kind"]) == (pred.error, pred.error_kind)
        if pred.error is None:
            assert abs(rec["logit"] - pred.logit) < 1e-6 and abs(rec["prob_fake"] - pred.prob_fake) < 1e-6
            assert rec["is_fake"] == pred.is_fake
    assert sum(p.error is None for p in expected) == 8
    assert by_path[str(poison)]["error"] == str(DecoderCrashed())
    assert by_path[str(hangs)]["error"] == str(DecoderTimedOut(10))
    assert (by_path[str(poison)]["error_kind"], by_path[str(hangs)]["error_kind"]) == ("crashed", "timeout")
    assert by_path[f"file://{imgs[0]}"]["logit"] == pytest.approx(by_path[str(imgs[0])]["logit"], abs=0)
    assert by_path[f"file://{tmp_path / 'missing.png'}"]["error"] == "no such file"
    # s3://: the object's record is the local copy's; a missing key and a listed prefix
    assert by_path[s3_img]["logit"] == pytest.approx(by_path[str(imgs[3])]["logit"], abs=0)
    assert by_path[s3_img]["label"] == 1 and by_path[s3_img]["set"] == "s3"
    assert by_path[f"s3://{S3_BUCKET}/no/such.png"]["error"] == "no such file"
    assert by_path[f"s3://{S3_BUCKET}/no/such.png"]["error_kind"] == "missing"
    assert by_path[f"{s3_dir}a/img04.png"]["logit"] == pytest.approx(by_path[str(imgs[4])]["logit"], abs=0)
    assert by_path[f"file://{imgs[0]}"]["label"] == 1 and by_path[f"file://{imgs[0]}"]["set"] == "uri"
    assert by_path[str(imgs[1])]["label"] is None
    # ten-crop: the probability is sigmoid of the mean of the ten views' logits (not the mean probability)
    from rine.inference.detector import prepare_views

    views = prepare_views(str(imgs[2]), det.config.preprocess, None)
    logits, _ = det.score_views(views)
    assert len(views) == 10 and by_path[str(imgs[2])]["logit"] == pytest.approx(logits.mean().item(), abs=1e-6)
    assert by_path[str(imgs[2])]["prob_fake"] == pytest.approx(torch.sigmoid(logits.mean()).item(), abs=1e-6)
    assert (logits - logits.mean()).abs().max() > 1e-4  # the views differ: no one crop's logit is the mean
    job = json.loads((out / MANIFEST_NAME).read_text())
    assert job["counts"] == {"inputs": 18, "records": 18, "scored": 11, "errors": 7, "missing": 0, "duplicates": 0,
                             "mismatched": 0, "complete": True}
    assert job["model_config"]["preprocess"]["crop"] == "ten" and job["status"] == "complete"


def test_an_official_pth_head_with_backbone_scores_as_rine_detect(ray_cluster, tmp_path, tiny_openai_file,
                                                                   sensitive_checkpoint_dir, capsys):
    """`rine batch --backbone B --head official.pth` (once "missing ... argument: 'head'") = `rine detect`."""
    from rine.cli import main

    from support.checkpoints import official_pth

    pth = official_pth(tmp_path, sensitive_checkpoint_dir)
    imgs, model = _images(tmp_path / "imgs", 5), ["--backbone", str(tiny_openai_file), "--head", str(pth), "--precision", "fp32"]
    assert main(["batch", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), *model, "--shard-size", "4",
                 "--batch-size", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["detect", *map(str, imgs), *model, "--format", "jsonl", "--output", str(tmp_path / "d.jsonl")]) == 0
    detect = {r["path"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert len(rows := _records(tmp_path / "out")) == len(imgs) == len(detect) and np.ptp([r["logit"] for r in rows]) > 0.1  # a head that tells them apart
    assert [(r["error"], r["is_fake"], abs(r["logit"] - detect[r["path"]]["logit"]) < 1e-5) for r in rows] == \
        [(None, detect[r["path"]]["is_fake"], True) for r in rows]  # fp32 noise of other batch sizes: 2e-6 seen


def test_a_killed_actor_is_survived_and_a_finished_job_is_not_redone(ray_cluster, tiny_checkpoint_dir, tmp_path, capsys):
    from rine.cli import main
    from rine.cluster.batch import run_batch
    from rine.cluster.job import BatchError

    marker = Path(os.environ["RINE_TEST_KILL_DIR"]) / "actor-killed"
    imgs = _images(tmp_path / "imgs", 12)
    out = tmp_path / "out"
    cfg = _cfg([tmp_path / "imgs"], out, tiny_checkpoint_dir, scorer="support.batch_jobs:ScorerKilledOnce")
    result = run_batch(cfg)
    assert marker.exists()  # the actor was killed mid-job
    assert result.error is None and result.exit_code == 0
    rows = _records(out)
    assert sorted(r["item"] for r in rows) == list(range(12)) and {r["path"] for r in rows} == {str(p) for p in imgs}

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("part-*")}
    capsys.readouterr()
    # the same job from the command line: nothing left to do, nothing written again
    assert main(["batch", str(tmp_path / "imgs"), "--out", str(out), "--model", str(tiny_checkpoint_dir),
                 "--precision", "fp32", "--shard-size", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "12 inputs: 12 scored, 0 errors; this run 0 records" in err and "3 shards were finished" in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("part-*")} == before
    assert len(_records(out)) == 12
    with pytest.raises(BatchError, match="other settings"):  # another model in the same folder would mix records
        run_batch(_cfg([tmp_path / "imgs"], out, tiny_checkpoint_dir, crop="ten"))
    write_image(tmp_path / "imgs" / "new.png")
    with pytest.raises(BatchError, match="the input list"):
        run_batch(cfg)


KILL_SCRIPT = """
import sys
from rine.cluster.batch import run_batch
from rine.cluster.job import BatchConfig
r = run_batch(BatchConfig(inputs=[sys.argv[1]], out=sys.argv[2], model=sys.argv[3], precision="fp32", shard_size=2,
              batch_size=2, decode_batch=2, progress=False, stall_timeout=60, temp_dir=sys.argv[4],
              scorer="support.batch_jobs:SlowScorer"))
sys.exit(r.exit_code)
"""


@pytest.mark.slow
def test_a_driver_killed_hard_then_rerun_finishes_with_every_input_once(tiny_checkpoint_dir, tmp_path):
    pytest.importorskip("ray")
    imgs = _images(tmp_path / "imgs", 12)
    out = tmp_path / "out"
    temp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")
    env = {**os.environ, **_worker_env(), "RINE_TEST_SLOW": "0.4", "RINE_TEST_CLUSTER": temp}
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "imgs"), str(out), str(tiny_checkpoint_dir), temp]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.kill()  # kill -9 of the driver, mid-job
        proc.wait()
        proc.stderr.close()
        _kill_cluster(temp)  # its local Ray outlives it
        kept = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.glob("part-*.parquet")}
        assert 2 <= len(kept) < 6  # killed with some shards finished and some not
        rerun = subprocess.run(cmd, env={**env, "RINE_TEST_SLOW": "0"}, capture_output=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    finally:
        _kill_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    rows = _records(out)
    assert sorted(r["item"] for r in rows) == list(range(12))  # every input exactly once
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in imgs)
    # the shards finished before the kill were kept, not redone
    assert {n: (out / n).stat().st_ino for n in kept} == {n: ino for n, (ino, _) in kept.items()}
    assert not list(out.glob("*.tmp"))


def test_taps_store_trains_the_same_weights_as_rine_extract(ray_cluster, tiny_backbone_dir, tmp_path):
    from rine.cli import main
    from rine.data.tap_store import FeatureStore

    root = tmp_path / "data"
    paths = []
    for cls in ("car", "cat"):
        for label_dir, seed in (("0_real", 0), ("1_fake", 100)):
            paths += _images(root / "train" / cls / label_dir, 3, seed=seed + len(paths))
    (root / "train" / "cat" / "1_fake" / "broken.png").write_bytes(b"not an image")
    from rine.data.datasets import progan_items

    items = progan_items(root, "train")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"path": it.path, "label": it.label, "set": it.set}) + "\n" for it in items))
    common = ["--backbone", str(tiny_backbone_dir), "--transform", "train", "--views", "2", "--seed", "3",
              "--shard-size", "5", "--dtype", "float32", "--no-progress"]
    assert main(["extract", "--root", str(root), "--layout", "progan", "--out", str(tmp_path / "ext"), *common]) == 1
    assert main(["batch", str(manifest), "--taps", "--out", str(tmp_path / "bat"), "--batch-size", "4",
                 "--decode-batch", "3", *common]) == 1
    ext, bat = FeatureStore.open(tmp_path / "ext"), FeatureStore.open(tmp_path / "bat")
    assert bat.complete and len(bat) == len(ext) == 2 * (len(items) - 1)
    assert np.array_equal(np.asarray(bat.taps), np.asarray(ext.taps))
    assert (bat.items.tolist(), bat.views.tolist(), bat.errors, bat.error_kinds) == \
        (ext.items.tolist(), ext.views.tolist(), ext.errors, ext.error_kinds)
    skip = {"layout", "split", "classes", "root", "inputs"}
    assert {k: v for k, v in bat.meta.items() if k not in skip} == {k: v for k, v in ext.meta.items() if k not in skip}
    train = ["--epochs", "2", "--batch-size", "4", "--nproj", "1", "--proj-dim", "8", "--seed", "1"]
    assert main(["train", "--features", str(tmp_path / "ext"), "--out", str(tmp_path / "c1"), *train]) == 0
    assert main(["train", "--features", str(tmp_path / "bat"), "--out", str(tmp_path / "c2"), *train]) == 0
    assert (tmp_path / "c1" / "model.safetensors").read_bytes() == (tmp_path / "c2" / "model.safetensors").read_bytes()
    assert main(["grid", "--features", str(tmp_path / "bat"), "--test-features", str(tmp_path / "bat"),
                 "--out", str(tmp_path / "g"), "--factors", "0.1", "--nproj", "1", "--proj-dims", "8",
                 "--epochs", "1", "--batch-size", "4"]) == 0
    assert (tmp_path / "g" / "best" / "model.safetensors").is_file()


def test_rows_carry_rine_detects_provenance_and_a_job_keeps_its_choice(ray_cluster, tiny_checkpoint_dir, tmp_path):
    """Rows' provenance (the JSON, the flat columns, the decision) equal `rine detect`'s records:
    a C2PA file verified under anchors that travel to the decoding tasks, an A1111 PNG, a plain
    JPEG, a cut PNG (its decoding error keeps its provenance) and a missing file; rerunning the job with --no-provenance is refused."""
    pytest.importorskip("c2pa")
    from rine.cli import main
    from rine.cluster.batch import run_batch
    from rine.cluster.job import BatchOptionError

    from support import provenance_files as pf

    ca, img, d = pf.make_authority(), pf.texture(240, 8), tmp_path / "imgs"
    d.mkdir()
    (tmp_path / "anchors.pem").write_bytes(ca.root_pem)
    (d / "signed.jpg").write_bytes(pf.sign(pf.encode(img, "JPEG", quality=90), "image/jpeg", ca, "trainedAlgorithmicMedia"))
    (d / "a1111.png").write_bytes(a1111 := pf.png_with_text(img, [("tEXt", "parameters", pf.A1111_PARAMETERS)]))
    (d / "cut.png").write_bytes(a1111[: len(a1111) // 2])  # a decoding error, with provenance beside it
    (d / "plain.jpg").write_bytes(pf.encode(img, "JPEG", quality=90))
    names = [str(d / n) for n in ("signed.jpg", "a1111.png", "plain.jpg", "cut.png")] + [str(tmp_path / "missing.png")]
    anchors = str(tmp_path / "anchors.pem")
    assert main(["detect", *names, "--model", str(tiny_checkpoint_dir), "--precision", "fp32", "--no-progress",
                 "--trust-anchors", anchors, "-o", str(tmp_path / "d.jsonl")]) == 1
    detect = {r["path"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    out = tmp_path / "out"
    assert run_batch(_cfg(names, out, tiny_checkpoint_dir, trust_anchors=anchors)).exit_code == 1
    rows = {r["path"]: r for r in _records(out)}
    for path, want in detect.items():
        row, prov = rows[path], want["provenance"]
        assert (json.loads(row["provenance"]) if row["provenance"] else None) == prov
        assert (row["decision"], row["decision_basis"]) == (want["decision"]["decision"], want["decision"]["basis"])
        assert row["provenance_verified"] == (prov["verified"] if prov else None)
        assert row["provenance_source_type"] == (prov and prov["digital_source_type"])
    assert rows[names[0]]["decision"] == "synthetic" and rows[names[0]]["provenance_verified"] is True
    assert "unverified declaration" in rows[names[1]]["decision_basis"] and rows[names[4]]["provenance"] is None
    assert rows[names[3]]["error"] and json.loads(rows[names[3]]["provenance"])["basis"] == "png:parameters"
    with pytest.raises(BatchOptionError, match="provenance differ"):
        run_batch(_cfg(names, out, tiny_checkpoint_dir, provenance=False))
