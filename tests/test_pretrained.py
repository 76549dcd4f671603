"""Named pretrained models: download, verification, caching and the offline message,
against real HTTP on loopback (tests/support/loopback_hub.py), never a mock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rine.model.checkpoints import git_blob_sha1, load_pretrained
from rine.model.pretrained import WeightsUnavailableError, resolve_pretrained

from conftest import OFFICIAL, REPO
from support.loopback_hub import LoopbackHub


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # downloads allowed, but only from loopback
    with LoopbackHub() as h:
        # the Hub answers (on loopback), so a backbone not yet cached counts as downloadable
        monkeypatch.setattr(hf_constants, "ENDPOINT", h.url)
        yield h


def test_head_download_verify_convert_and_cache(hub, monkeypatch):
    hub.raw["ckpt/model_2class_trainable.pth"] = (OFFICIAL / "model_2class_trainable.pth").read_bytes()
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/ckpt")
    folder = resolve_pretrained("rine-vitl14-2class")
    head, config = load_pretrained(folder)
    assert config.name == "rine-vitl14-2class" and config.backbone == "ViT-L/14"
    assert config.backbone_revision == "32bd64288804d66eefd0ccbe215aa642df71cc41"
    assert config.meta["head_blob_sha1"] == "b8418b5884fd1fc1dba79bea91f41ab2341673d8"
    official = torch.load(str(OFFICIAL / "model_2class_trainable.pth"), map_location="cpu", weights_only=True)
    for k, v in official.items():
        torch.testing.assert_close(head.state_dict()[k], v.float().cpu(), rtol=0, atol=0)
    n_requests = len(hub.requests)
    assert resolve_pretrained("rine-vitl14-2class") == folder
    # second use: the head from the cache; the only request is the one-shot check that the Hub
    # answers, since ViT-L/14 is not in the Hugging Face cache and would be downloaded next
    assert hub.requests[n_requests:] == ["HEAD /"]


def test_corrupt_download_is_rejected_and_not_kept(hub, monkeypatch, tmp_path):
    hub.raw["ckpt/model_2class_trainable.pth"] = b"tampered bytes"
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/ckpt")
    with pytest.raises(WeightsUnavailableError, match="git blob id"):
        resolve_pretrained("rine-vitl14-2class")
    heads = tmp_path / "rine-home" / "heads"
    assert not heads.exists() or list(heads.iterdir()) == []


def test_unreachable_source_names_what_is_missing_and_the_local_way(hub, monkeypatch):
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/nothing-here")
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_pretrained("rine-vitl14-4class")
    msg = str(err.value)
    assert "model_4class_trainable.pth" in msg
    assert "openai/clip-vit-large-patch14" not in msg  # not cached, but the Hub answers: it would download
    assert "--backbone" in msg and "--head" in msg and "RINE_HOME" in msg


def test_missing_head_message_leaves_out_the_users_own_backbone(hub, monkeypatch, capsys, tiny_backbone_dir):
    """`rine detect IMG --backbone DIR` with the default model: only the head is missing."""
    from rine.cli import main

    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/nothing-here")
    assert main(["detect", str(OFFICIAL / "real_aadlygmazf.jpg"), "--backbone", str(tiny_backbone_dir)]) == 2
    err = capsys.readouterr().err
    assert "model_4class_trainable.pth" in err and "openai/clip-vit-large-patch14" not in err, err
    assert f"--backbone {tiny_backbone_dir} --head /path/to/model_4class_trainable.pth" in err


def test_offline_mode_does_not_touch_the_network(hub, monkeypatch):
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/ckpt")
    monkeypatch.setenv("RINE_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="offline"):
        resolve_pretrained("rine-vitl14-1class")
    assert hub.requests == []


NAMED_FLOW = textwrap.dedent(
    """
    import json, sys
    from rine.model.registry import BACKBONES, BackboneSpec
    from rine.model.pretrained import PretrainedSpec, register_pretrained
    from rine.cli import main
    cfg = json.loads(sys.argv[1])
    BACKBONES["tiny"] = BackboneSpec("tiny", "tiny-org/tiny-clip", cfg["commit"], 64, 3, 32, 224)
    register_pretrained(PretrainedSpec("rine-tiny", "tiny", "tiny_trainable.pth", cfg["blob"], "test model"))
    sys.exit(main(["detect", *cfg["images"], "--model", "rine-tiny", "--format", "json", "--no-progress"]))
    """
)


def test_named_model_downloads_backbone_and_head_then_works_offline(hub, tiny_backbone_dir, sensitive_checkpoint_dir, tmp_path):
    """The whole first-use path in a fresh process: HF_ENDPOINT and the head URL on loopback."""
    from rine.inference.detector import Detector

    head_file = tmp_path / "tiny_trainable.pth"  # the sensitive head, in the official format
    torch.save(load_pretrained(sensitive_checkpoint_dir)[0].state_dict(), head_file)
    hub.raw["ckpt/tiny_trainable.pth"] = head_file.read_bytes()
    commit = hub.add_repo_folder("tiny-org/tiny-clip", tiny_backbone_dir)
    images = [str(OFFICIAL / "real_aadlygmazf.jpg"), str(OFFICIAL / "fake_dalle_zzrybysskm.png")]
    arg = json.dumps({"commit": commit, "blob": git_blob_sha1(head_file), "images": images})
    env = dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        RINE_HEAD_BASE_URL=f"{hub.url}/raw/ckpt",
        PYTHONPATH=str(REPO / "src"),
    )

    def run(**extra):
        return subprocess.run(
            [sys.executable, "-c", NAMED_FLOW, arg], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )

    first = run()
    assert first.returncode == 0, first.stderr
    records = json.loads(first.stdout)
    assert [r["path"] for r in records] == images
    assert all(r["error"] is None for r in records)
    # the downloaded model scores as the same backbone and head loaded from local files
    local = Detector.from_files(str(tiny_backbone_dir), str(head_file)).predict(images)
    np.testing.assert_allclose([r["prob_fake"] for r in records], [p.prob_fake for p in local], atol=1e-6, rtol=0)
    assert any("/resolve/" in r and "model.safetensors" in r for r in hub.requests)
    assert any(r.endswith("/tiny_trainable.pth") for r in hub.requests)

    # Second run: offline, the hub gone; everything comes from RINE_HOME and HF_HOME.
    hub.server.shutdown()
    second = run(HF_HUB_OFFLINE="1", RINE_OFFLINE="1")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == records


def test_ldm_model_defaults_to_ten_crop(hub, monkeypatch, tiny_backbone_dir, sensitive_checkpoint_dir, sensitive_detector, tmp_path):
    """`rine-vitl14-ldm` scores with the ten-crop protocol unless told otherwise (the paper's
    Synthbuster setting): its spec as registered, with the sensitive head served as its file."""
    from dataclasses import replace

    from rine.inference.detector import Detector
    from rine.model.pretrained import PRETRAINED

    from conftest import write_image

    head_file = tmp_path / "model_ldm_trainable.pth"
    torch.save(load_pretrained(sensitive_checkpoint_dir)[0].state_dict(), head_file)
    hub.raw["ckpt/model_ldm_trainable.pth"] = head_file.read_bytes()
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/ckpt")
    spec = PRETRAINED["rine-vitl14-ldm"]
    monkeypatch.setitem(PRETRAINED, spec.name, replace(spec, head_blob_sha1=git_blob_sha1(head_file)))
    det = Detector.from_pretrained("rine-vitl14-ldm", backbone=str(tiny_backbone_dir), precision="fp32")
    assert det.config.preprocess.crop == "ten"
    image = str(write_image(tmp_path / "x.png", size=(600, 400), seed=4))
    ten = det.predict([image])[0].prob_fake
    center = Detector.from_pretrained("rine-vitl14-ldm", backbone=str(tiny_backbone_dir), crop="center", precision="fp32")
    assert center.config.preprocess.crop == "center"  # --crop still overrides it
    assert abs(ten - center.predict([image])[0].prob_fake) > 0.01  # the two protocols differ on this image
    assert ten == pytest.approx(Detector.from_pretrained(str(sensitive_checkpoint_dir), crop="ten", precision="fp32").predict([image])[0].prob_fake, abs=1e-6)
    assert sensitive_detector.config.preprocess.crop == "center"


# ---------------------------------------------------------------------------- missing and offline weights (issue 26)
HEAD_2CLASS = OFFICIAL / "model_2class_trainable.pth"


@pytest.fixture
def no_hub_downloads(monkeypatch):
    """transformers' download path must not be reached: it retried for 30 s, then a traceback."""
    from transformers import CLIPVisionModel

    def refuse(*args, **kwargs):
        raise AssertionError(f"CLIPVisionModel.from_pretrained{args} reached")

    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", refuse)


def _detect(capsys, *argv):
    from rine.cli import main

    code = main(["detect", str(OFFICIAL / "real_aadlygmazf.jpg"), *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("given", ["./clip-vit-large-patch14", "models/openai/clip-vit-large-patch14", "ViT-L-14.pt"])
def test_a_missing_backbone_path_is_a_missing_file_not_a_hub_id(given, capsys, monkeypatch, tmp_path, no_hub_downloads):
    monkeypatch.chdir(tmp_path)
    code, err = _detect(capsys, "--backbone", given, "--head", HEAD_2CLASS)
    assert code == 2
    assert given in err and "no such file or folder" in err and "Repo id" not in err and "Traceback" not in err
    # with a named model too (the head is missing as well): both named in one message
    code, err = _detect(capsys, "--backbone", given)
    assert code == 2 and given in err and "no such file or folder" in err and "model_4class_trainable.pth" in err


@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_a_named_backbone_without_network_fails_fast_with_the_fix(network, capsys, monkeypatch, no_hub_downloads):
    """HF_HUB_OFFLINE=1, or a Hub that does not answer: one clean message, exit 2, in seconds."""
    import time

    import huggingface_hub.constants as hf_constants

    if network == "unreachable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    code, err = _detect(capsys, "--backbone", "ViT-L/14", "--head", HEAD_2CLASS)
    took = time.monotonic() - start
    assert code == 2 and "Traceback" not in err
    assert "backbone openai/clip-vit-large-patch14 at revision 32bd64288804d66eefd0ccbe215aa642df71cc41" in err
    assert ("offline mode is on" if network == "offline" else "http://127.0.0.1:9 unreachable") in err
    assert "fix: " in err and "hf download openai/clip-vit-large-patch14" in err and "--backbone /path/to/" in err
    assert took < 15, took  # loading the head included; the Hub's retries took 30 s
    # an OSError too, as transformers' own was: rine extract, train and batch catch that
    from rine.model.backbones import load_backbone

    with pytest.raises(OSError) as raised:
        load_backbone("ViT-L/14")
    assert isinstance(raised.value, WeightsUnavailableError) and raised.value.missing[0].what.startswith("backbone")


def test_every_missing_piece_is_named_at_once_with_its_own_fix(monkeypatch, no_hub_downloads):
    """Head cached, backbone missing: only the backbone is named (no advice to put the head
    where it already is), before any backbone load; both missing: both, each with a fix."""
    import shutil

    from rine.model.pretrained import rine_home

    with pytest.raises(WeightsUnavailableError) as both:
        resolve_pretrained("rine-vitl14-2class")
    assert [p.what.split()[0] for p in both.value.missing] == ["head", "backbone"]
    assert str(both.value).count("fix: ") == 2
    heads = rine_home() / "heads"
    heads.mkdir(parents=True)
    shutil.copy(HEAD_2CLASS, heads / "model_2class_trainable.pth")
    with pytest.raises(WeightsUnavailableError) as one:
        resolve_pretrained("rine-vitl14-2class")
    assert [p.what.split()[0] for p in one.value.missing] == ["backbone"]
    assert "model_2class_trainable.pth" not in str(one.value) and str(one.value).count("fix: ") == 1
    # what needs the head only (rine calibrate --predictions) still gets it
    head, config = load_pretrained(resolve_pretrained("rine-vitl14-2class", check_backbone=False))
    assert config.name == "rine-vitl14-2class"


def test_each_download_failure_is_said_once(hub, monkeypatch, capsys, caplog, tiny_backbone_dir):
    monkeypatch.setenv("RINE_HEAD_BASE_URL", f"{hub.url}/raw/nothing-here")
    code, err = _detect(capsys, "--backbone", tiny_backbone_dir)
    assert code == 2
    said = err + caplog.text
    for source in (f"{hub.url}/raw/nothing-here/model_4class_trainable.pth", "http://127.0.0.1:9/unreachable"):
        assert said.count(source) == 1, (source, said)


def test_rine_models_prints_its_table_without_torch():
    code = "import sys\nfrom rine.cli import main\nassert main(['models']) == 0\nprint('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "openai/clip-vit-large-patch14" in done.stdout and "rine-vitl14-4class" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_backbone_weights_error_reaches_the_caller_as_it_is(monkeypatch, tmp_path, tiny_checkpoint_dir):
    """Detector.from_pretrained lets the model layer's WeightsUnavailableError through
    unchanged: the same object, its `missing` pieces kept (a rewrap used to drop them)."""
    from dataclasses import replace

    import rine.inference.detector as detector_module
    from rine.inference.detector import Detector
    from rine.model.checkpoints import save_pretrained
    from rine.model.pretrained import BackboneUnavailableError, MissingPiece

    head, config = load_pretrained(tiny_checkpoint_dir)
    folder = save_pretrained(head, replace(config, backbone="ViT-B/32"), tmp_path / "ckpt")  # not a local path
    piece = MissingPiece("backbone openai/clip-vit-base-patch32", "offline", "run once with network")
    raised = BackboneUnavailableError("backbone ViT-B/32 could not be loaded", [piece])

    def unavailable(source, revision=None):
        raise raised

    monkeypatch.setattr(detector_module, "load_backbone", unavailable)
    with pytest.raises(WeightsUnavailableError) as caught:
        Detector.from_pretrained(str(folder), device="cpu")
    assert caught.value is raised and caught.value.missing == (piece,)
