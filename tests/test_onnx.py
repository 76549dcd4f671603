"""ONNX export and the ONNX Runtime backend: parity with torch, the CLI, the server, refusals.

Exports are made once per module (tracing a tiny model takes ~20 s) through `rine export`.
The head is SENSITIVE (onnx_fixtures.sensitive_head): its logits over the test images span
several units, so that a 1e-5 agreement means something.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from rine.cli import main  # noqa: E402
from rine.config import RINEConfig  # noqa: E402
from rine.inference.detector import Detector  # noqa: E402
from rine.inference.onnx_backend import OnnxBackendError, OnnxRuntimeBackend, load_onnx_detector  # noqa: E402

from support.onnx_fixtures import (  # noqa: E402
    export_with_cli,
    image_crops,
    image_paths,
    make_sensitive_checkpoint,
)


@pytest.fixture(scope="module")
def sensitive_checkpoint(tiny_backbone_dir, tmp_path_factory):
    return make_sensitive_checkpoint(tiny_backbone_dir, tmp_path_factory.mktemp("ckpt") / "sensitive")


@pytest.fixture(scope="module")
def torch_detector(sensitive_checkpoint):
    return Detector.from_pretrained(str(sensitive_checkpoint), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def fp32_export(sensitive_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fp32"
    return export_with_cli(sensitive_checkpoint, out, "--check-images", str(image_paths()[0].parent))


@pytest.fixture(scope="module")
def fp16_export(sensitive_checkpoint, tmp_path_factory):
    return export_with_cli(sensitive_checkpoint, tmp_path_factory.mktemp("export") / "fp16", "--fp16")


@pytest.fixture(scope="module")
def crops(torch_detector):
    return image_crops(torch_detector.config.preprocess)  # [10, 224, 224, 3]


def test_the_head_is_sensitive(torch_detector, crops):
    """The parity below is only worth something if the logits move a lot between images."""
    logits, _ = torch_detector.score_views(crops)
    assert float(logits.max() - logits.min()) > 6.0
    assert float(logits.std()) > 2.0


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_onnx_runtime_equals_torch_in_logits_taps_and_contributions(fp32_export, torch_detector, crops, batch):
    backend = OnnxRuntimeBackend(fp32_export)
    want_logits, want_contrib = torch_detector.score_views(crops)
    want_taps = torch_detector.encode_views(crops, batch_size=batch)
    for i in range(0, len(crops), batch):  # the last batch is short: every size the axis takes
        logits, contrib = backend.score_views(crops[i : i + batch])
        assert logits.shape == (len(crops[i : i + batch]),)
        np.testing.assert_allclose(logits, want_logits[i : i + batch], rtol=0, atol=1e-5)
        np.testing.assert_allclose(contrib, want_contrib[i : i + batch], rtol=0, atol=1e-5)
    taps = backend.encode_views(crops, batch_size=batch)
    assert taps.shape == want_taps.shape == (len(crops), 3, 64)
    np.testing.assert_allclose(taps, want_taps, rtol=0, atol=1e-5)


def test_the_export_folder_describes_itself(fp32_export, sensitive_checkpoint):
    import onnx

    assert sorted(p.name for p in fp32_export.iterdir()) == ["config.json", "model.onnx", "model.safetensors", "onnx.json"]
    assert RINEConfig.load(fp32_export / "config.json") == RINEConfig.load(sensitive_checkpoint / "config.json")
    manifest = json.loads((fp32_export / "onnx.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 20
    assert manifest["onnx_bytes"] == (fp32_export / "model.onnx").stat().st_size < 2**31
    check = manifest["check"]
    assert check["n_crops"] == 8 and check["source"] == "8 images" and 1 in check["batch_sizes"]
    assert check["max_abs_diff"]["logit"] < 1e-5
    model = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # one file
    (x,) = model.graph.input
    assert x.name == "crops" and x.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [224, 224, 3]  # dynamic batch
    assert [o.name for o in model.graph.output] == ["logit", "block_contribution", "taps"]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}


def test_rine_export_prints_the_check(sensitive_checkpoint, fp32_export, tmp_path, capsys, monkeypatch):
    """What `rine export` prints: the file, and ONNX Runtime against torch with its numbers.
    (Tracing is replaced by a copy of a real export of the same model, to stay fast.)"""
    import rine.export.onnx as ex

    monkeypatch.setattr(ex, "_export", lambda graph, path, *a: shutil.copy(fp32_export / "model.onnx", path))
    assert main(["export", "--format", "onnx", "--model", str(sensitive_checkpoint), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "check: ONNX Runtime (fp32, CPU) against torch fp32 on 4 crops (test patterns), batch sizes 1, 3, 4" in out
    assert "largest differences logit" in out and f"rine detect --model {tmp_path / 'o'}" in out


def _detect(capsys, *argv):
    code = main(["detect", *argv, "--format", "jsonl", "--no-progress"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("crop", ["center", "ten"])
def test_rine_detect_onnxruntime_equals_torch(fp32_export, sensitive_checkpoint, tmp_path, capsys, crop):
    """Same files, same records: probabilities to 1e-5, and the same error record for a bad file."""
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text")
    inputs = [*map(str, image_paths()), str(bad)]
    code_t, torch_recs, _ = _detect(capsys, *inputs, "--model", str(sensitive_checkpoint), "--precision", "fp32",
                                    "--crop", crop)
    code_o, ort_recs, err = _detect(capsys, *inputs, "--model", str(fp32_export), "--backend", "onnxruntime",
                                    "--crop", crop)
    assert code_t == code_o == 1, err  # one input could not be scored
    assert [r["path"] for r in ort_recs] == inputs
    probs = [r["prob_fake"] for r in torch_recs if r["error"] is None]
    assert max(probs) - min(probs) > 0.5  # the records differ between images
    for t, o in zip(torch_recs, ort_recs, strict=True):
        assert t["error"] == o["error"]
        if t["error"] is None:
            assert o["prob_fake"] == pytest.approx(t["prob_fake"], abs=1e-5)
            assert o["is_fake"] == t["is_fake"]
    # --backend auto (the default) picks ONNX Runtime for an export folder
    code, auto_recs, _ = _detect(capsys, *inputs[:2], "--model", str(fp32_export), "--crop", crop)
    assert [r["prob_fake"] for r in auto_recs] == [r["prob_fake"] for r in ort_recs[:2]]


def test_fp16_export_keeps_float32_io_and_is_measured(fp16_export, fp32_export, torch_detector, crops):
    import onnx

    model = onnx.load(str(fp16_export / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert (fp16_export / "model.onnx").stat().st_size < 0.7 * (fp32_export / "model.onnx").stat().st_size
    detector = load_onnx_detector(fp16_export)
    assert detector.precision == "fp16"
    logits, _ = detector.score_views(crops)
    want, _ = torch_detector.score_views(crops)
    diff = float((torch.sigmoid(logits) - torch.sigmoid(want)).abs().max())
    # fp16 rounding moves probabilities, but not by much; the figure is in docs/deployment.md
    assert 0 < diff < 0.02
    assert json.loads((fp16_export / "onnx.json").read_text())["check"]["max_abs_diff"]["prob_fake"] > 0


# ---------------------------------------------------------------------- refusals
def _fails(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_export_refuses_bf16_bad_opsets_and_an_existing_export(sensitive_checkpoint, fp32_export, tmp_path, capsys):
    base = ["export", "--format", "onnx", "--model", str(sensitive_checkpoint)]
    err = _fails(capsys, *base, "--out", str(tmp_path / "a"), "--precision", "bf16")
    assert "bf16" in err and "CPU provider" in err and "--fp16" in err
    err = _fails(capsys, *base, "--out", str(tmp_path / "b"), "--opset", "17")
    assert "--opset 17" in err and "18 to 23" in err
    err = _fails(capsys, *base, "--out", str(fp32_export))
    assert "already holds an export" in err and "--overwrite" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_refuses_an_unfaithful_graph_and_leaves_nothing(sensitive_checkpoint, fp32_export, tmp_path, monkeypatch):
    """A graph that does not compute what torch computes (here: another head's graph) is refused."""
    import rine.export.onnx as ex
    from rine.model.checkpoints import load_pretrained
    from rine.model.rine_model import RINEModel

    monkeypatch.setattr(ex, "_export", lambda graph, path, *a: shutil.copy(fp32_export / "model.onnx", path))
    det = Detector.from_pretrained(str(sensitive_checkpoint), device="cpu", precision="fp32")
    head, config = load_pretrained(sensitive_checkpoint)
    with torch.no_grad():
        head.head[6].bias.add_(1e-3)  # off by a thousandth of a logit
    with pytest.raises(ex.ExportError, match="differ from torch's"):
        ex.export_onnx(RINEModel(det.model.backbone, head), config, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_released_weights_and_oversized_graphs(torch_detector, sensitive_checkpoint, monkeypatch):
    import rine.export.onnx as ex

    monkeypatch.setattr(ex, "MAX_SINGLE_FILE_BYTES", 1000)
    with pytest.raises(ex.ExportError, match=r"below 2 GB"):
        ex.check_exportable(torch_detector.model, opset=20, precision="fp32")
    released = Detector.from_pretrained(str(sensitive_checkpoint), device="cpu", precision="fp32", keep_reference=False)
    with pytest.raises(ex.ExportError, match="keep_reference=True"):
        ex.check_exportable(released.model, opset=20, precision="fp32")


def test_backend_refusals(fp32_export, sensitive_checkpoint, tmp_path, capsys):
    img = str(image_paths()[0])
    err = _fails(capsys, "detect", img, "--model", str(sensitive_checkpoint), "--backend", "onnxruntime")
    assert "not an export folder" in err and "rine export --format onnx" in err
    err = _fails(capsys, "detect", img, "--model", str(fp32_export), "--precision", "bf16")
    assert "this export is fp32" in err
    err = _fails(capsys, "detect", img, "--model", str(fp32_export), "--providers", "tensorrt")
    assert "TensorrtExecutionProvider" in err and "not available" in err and "CPUExecutionProvider" in err
    err = _fails(capsys, "detect", img, "--model", str(sensitive_checkpoint), "--providers", "cpu")
    assert "--providers is for --backend onnxruntime" in err
    broken = tmp_path / "broken"
    shutil.copytree(fp32_export, broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.truncate(1000)
    err = _fails(capsys, "detect", img, "--model", str(broken))
    assert "model.onnx" in err and "truncated" in err
    with pytest.raises(OnnxBackendError, match="no onnx.json"):
        load_onnx_detector(sensitive_checkpoint)


# ---------------------------------------------------------------------- server and eval
def test_server_scores_through_onnx_runtime_like_torch(fp32_export, torch_detector):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.server.app import create_app

    files = [("files", (p.name, p.read_bytes())) for p in image_paths()[-2:]]
    answers = []
    for detector in (torch_detector, load_onnx_detector(fp32_export)):
        with TestClient(create_app(detector)) as client:
            r = client.post("/v1/detect", files=files)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            assert client.get("/v1/model").json()["n_blocks"] == 3
    (t, o) = answers
    assert t["model_block_importance"] == o["model_block_importance"]
    for a, b in zip(t["results"], o["results"], strict=True):
        assert b["prob_fake"] == pytest.approx(a["prob_fake"], abs=1e-5)
        assert b["verdict"] == a["verdict"]
        np.testing.assert_allclose(b["block_importance"], a["block_importance"], atol=1e-5)


def test_rine_eval_onnxruntime_equals_torch(fp32_export, sensitive_checkpoint, tmp_path, capsys):
    pytest.importorskip("sklearn")
    root = tmp_path / "data" / "set1"
    paths = image_paths()
    for i, p in enumerate(paths):
        dest = root / ("0_real" if i % 2 else "1_fake") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    preds = {}
    for name, model, extra in (("torch", sensitive_checkpoint, ["--precision", "fp32"]),
                               ("ort", fp32_export, ["--backend", "onnxruntime"])):
        out = tmp_path / name
        code = main(["eval", "--suite", "folder", "--root", str(tmp_path / "data"), "--out", str(out),
                     "--model", str(model), "--no-plots", "--no-progress", *extra])
        assert code == 0, capsys.readouterr().err
        lines = next(out.rglob("predictions.jsonl")).read_text().splitlines()
        preds[name] = {r["path"]: r["prob_fake"] for r in map(json.loads, lines)}
    assert preds["torch"].keys() == preds["ort"].keys() and len(preds["ort"]) == len(paths)
    for path, p in preds["torch"].items():
        assert preds["ort"][path] == pytest.approx(p, abs=1e-5)
    err = _fails(capsys, "eval", "--suite", "folder", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "c"),
                 "--model", str(fp32_export), "--features-cache", str(tmp_path / "cache"))
    assert "features cache needs the torch backend" in err


def test_a_calibrated_export_decides_as_the_calibrated_checkpoint(fp32_export, sensitive_checkpoint, tmp_path, capsys):
    """The calibration in an export's config.json is applied by the shared decision rule: the
    ONNX Runtime records equal the torch records of the same calibrated checkpoint, threshold
    and verdict included (a backend built without the rule answered 500 in rine serve)."""
    import shutil

    calibration = {"method": "platt", "threshold_logit": 0.4, "scale": 0.5, "offset": -0.3,
                   "uncertain_low": 0.45, "uncertain_high": 0.6}
    folders = []
    for src, name in ((sensitive_checkpoint, "ckpt"), (fp32_export, "export")):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["calibration"] = calibration
        (dst / "config.json").write_text(json.dumps(cfg))
        folders.append(dst)
    inputs = [str(p) for p in image_paths()]
    _, torch_recs, _ = _detect(capsys, *inputs, "--model", str(folders[0]), "--precision", "fp32")
    _, ort_recs, err = _detect(capsys, *inputs, "--model", str(folders[1]), "--backend", "onnxruntime")
    assert len(ort_recs) == len(inputs), err
    verdicts = {r["verdict"] for r in torch_recs}
    assert {"real", "synthetic"} <= verdicts  # the cut falls inside the scores
    for t, o in zip(torch_recs, ort_recs, strict=True):
        assert o["threshold"] == t["threshold"] == pytest.approx(1 / (1 + np.exp(-0.4)))
        assert o["verdict"] == t["verdict"] and o["is_fake"] == t["is_fake"]
        assert o["prob_fake"] == pytest.approx(t["prob_fake"], abs=1e-5)
        # calibrated probability: sigmoid(0.5 * logit - 0.3), not sigmoid(logit)
        assert t["prob_fake"] == pytest.approx(1 / (1 + np.exp(-(0.5 * t["logit"] - 0.3))), abs=1e-6)
