"""Head checkpoints: the official `*_trainable.pth` files and our own folder format.

Our format is a folder with `config.json` (RINEConfig) and `model.safetensors`
(the head's state dict, official key names). Official files are pickles: they are
only ever read with `torch.load(weights_only=True, map_location="cpu")` (they hold
tensors tagged `cuda:0`), and converted once to safetensors.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import CONFIG_NAME, WEIGHTS_NAME, HeadConfig, RINEConfig
from ..fileio import atomic_file
from .head import RINEHead


class CheckpointError(ValueError):
    pass


def git_blob_sha1(path: str | Path) -> str:
    """Git's blob id of a file: SHA-1 of `blob <size>\\0` + content."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def head_digest(head: RINEHead) -> str:
    """A short digest of a head's weights (names, shapes and float32 values): the same for
    the same head however it was stored (config.json + model.safetensors, an official .pth,
    a calibrated copy, which shares the weights), so that its scores can be traced to it."""
    h = hashlib.sha256()
    for name, tensor in sorted(head.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(values.shape)}\n".encode())
        h.update(values.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official `*_trainable.pth` (safe load, CPU)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors")
    return {k: v.float().contiguous() for k, v in obj.items()}


def infer_head_config(state: dict[str, torch.Tensor]) -> HeadConfig:
    """nproj, proj_dim, in_dim and blocks from the shapes of an official-format state dict."""
    proj1 = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"proj1\.(\d+)\.weight", k)))
    if not proj1 or "head.6.weight" not in state:
        raise CheckpointError(
            "not a RINE head state dict: expected keys proj1.N.weight and head.6.weight, "
            f"found {sorted(state)[:8]}..."
        )
    nproj = len(proj1)
    proj_dim, in_dim = state["proj1.1.weight"].shape
    if "alpha" in state:
        n_blocks = state["alpha"].shape[1]
        use_tie = True
    else:
        raise CheckpointError(
            "state dict has no `alpha`: cannot infer the number of blocks; "
            "load it through a config.json that states them"
        )
    return HeadConfig(in_dim=int(in_dim), n_blocks=int(n_blocks), nproj=nproj, proj_dim=int(proj_dim), use_tie=use_tie)


def head_from_state_dict(state: dict[str, torch.Tensor], config: HeadConfig | None = None) -> RINEHead:
    """A RINEHead with `state` loaded strictly (names and shapes must match exactly)."""
    config = config or infer_head_config(state)
    head = RINEHead(config)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"head weights do not match {config}: {e}") from None
    return head.eval()


def load_official_head(path: str | Path, expected_blob_sha1: str | None = None) -> RINEHead:
    """Load an official `*_trainable.pth`, optionally verifying its git blob id first."""
    if expected_blob_sha1 is not None:
        actual = git_blob_sha1(path)
        if actual != expected_blob_sha1:
            raise CheckpointError(f"{path}: git blob id {actual} != expected {expected_blob_sha1}")
    return head_from_state_dict(read_official_state_dict(path))


def save_pretrained(head: RINEHead, config: RINEConfig, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.head != head.config:
        raise CheckpointError(f"config.head {config.head} does not describe the head {head.config}")
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        # One metadata key only: safetensors writes metadata from a hash map, so several keys
        # would come out in a different order from run to run and break byte-identical files.
        save_file(state, str(tmp), metadata={"format": "pt"})
    config.save(directory / CONFIG_NAME)
    return directory


def load_pretrained(directory: str | Path) -> tuple[RINEHead, RINEConfig]:
    """Read a folder written by `save_pretrained`."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{directory} is not a RINE checkpoint folder: {p.name} is missing")
    config = RINEConfig.load(cfg_path)
    head = head_from_state_dict(load_file(str(w_path), device="cpu"), config.head)
    return head, config


def load_head(source: str | Path) -> tuple[RINEHead, RINEConfig | None]:
    """A head from our folder (with its config) or an official `.pth`/`.safetensors` file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_pretrained(path)
    if not path.is_file():
        raise CheckpointError(f"head {path} does not exist (expected a .pth file or a checkpoint folder)")
    if path.suffix == ".safetensors":
        return head_from_state_dict(load_file(str(path), device="cpu")), None
    return head_from_state_dict(read_official_state_dict(path)), None
