"""Named pretrained RINE detectors: where their weights come from and how they are cached.

Provenance is kept apart from the architecture: each entry names a backbone from
`backbones.BACKBONES` (downloaded from the Hugging Face Hub by `transformers`, so
`HF_HOME`, `HF_HUB_OFFLINE` and `HF_ENDPOINT` apply) and an official head file from
the reference repository, verified by its git blob id and converted once to our
format under `$RINE_HOME/models/<name>/` (default `~/.cache/rine`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# torch-free at import (checkpoints and backbones are imported where weights are handled):
# the CLI builds its --help from this registry.
from ..config import CONFIG_NAME, WEIGHTS_NAME, PreprocessConfig, RINEConfig
from ..errors import UnknownNameError
from ..fileio import atomic_file

logger = logging.getLogger(__name__)

REFERENCE_COMMIT = "9b7fd5857cc205d0412be6aeee0d7611b95bd620"
DEFAULT_HEAD_BASE_URL = f"https://raw.githubusercontent.com/mever-team/rine/{REFERENCE_COMMIT}/ckpt"
# The second source of the official heads: SIDBench's weights repo on the Hub holds the same
# files under rine/, checked against the same git blob ids (RINE_SIDBENCH_BASE_URL overrides).
SIDBENCH_REPO = "dkarageo/sidbench"


@dataclass(frozen=True)
class PretrainedSpec:
    name: str
    backbone: str
    head_file: str
    head_blob_sha1: str
    description: str
    crop: str = "center"
    training: dict = field(default_factory=dict)


PRETRAINED: dict[str, PretrainedSpec] = {
    s.name: s
    for s in [
        PretrainedSpec(
            "rine-vitl14-1class", "ViT-L/14", "model_1class_trainable.pth",
            "802e8dce29925de10a8f4bfd96c4b627d0c0cdfe",
            "ProGAN horse; nproj 4, proj_dim 1024, factor 0.1; paper mean ACC/AP 90.3/98.6",
            training={"classes": ["horse"], "factor": 0.1},
        ),
        PretrainedSpec(
            "rine-vitl14-2class", "ViT-L/14", "model_2class_trainable.pth",
            "b8418b5884fd1fc1dba79bea91f41ab2341673d8",
            "ProGAN chair, horse; nproj 4, proj_dim 128, factor 0.2; paper mean ACC/AP 87.7/98.7",
            training={"classes": ["chair", "horse"], "factor": 0.2},
        ),
        PretrainedSpec(
            "rine-vitl14-4class", "ViT-L/14", "model_4class_trainable.pth",
            "bf5cd4053b5eaf64a0bd52cdb6bd0dbd9a8bc457",
            "ProGAN car, cat, chair, horse; nproj 2, proj_dim 1024, factor 0.2; paper mean ACC/AP 91.5/98.8",
            training={"classes": ["car", "cat", "chair", "horse"], "factor": 0.2},
        ),
        PretrainedSpec(
            "rine-vitl14-ldm", "ViT-L/14", "model_ldm_trainable.pth",
            "6b225b2aeae4f52e99a7fb675d8bcb736aea4a2e",
            "latent-diffusion training set; nproj 4, proj_dim 1024; Synthbuster ten-crop ACC/AP 87.4/90.5",
            crop="ten",
            training={"dataset": "ldm"},
        ),
    ]
}

DEFAULT_MODEL = "rine-vitl14-4class"


def list_pretrained() -> list[str]:
    return sorted(PRETRAINED)


def register_pretrained(spec: PretrainedSpec) -> None:
    """Add a named model (e.g. a lab's own head published at `RINE_HEAD_BASE_URL`)."""
    PRETRAINED[spec.name] = spec


def backbone_cached(hub_id: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds a Hub backbone's config and weights at `revision`
    (a file stat, no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(hub_id, filename, revision=revision), str)

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))


def backbone_is_cached(backbone: str) -> bool:
    """Whether the Hugging Face cache already holds this registry backbone."""
    from .registry import BACKBONES

    spec = BACKBONES.get(backbone)
    return spec is not None and backbone_cached(spec.hub_id, spec.revision)


def rine_home() -> Path:
    """`$RINE_HOME`, else `$XDG_CACHE_HOME/rine`, else `~/.cache/rine`."""
    if os.environ.get("RINE_HOME"):
        return Path(os.environ["RINE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rine"


def is_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("RINE_OFFLINE", "HF_HUB_OFFLINE"))


@dataclass(frozen=True)
class MissingPiece:
    """One piece of weights that cannot be had now, why, and how to provide it."""

    what: str  # "head model_4class_trainable.pth", "backbone openai/clip-vit-large-patch14 at revision ..."
    reason: str
    fix: str


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable. The message lists every
    missing piece (`missing`) with its own fix."""

    def __init__(self, message: str, missing: Sequence[MissingPiece] = ()):
        super().__init__(message)
        self.missing = tuple(missing)


class BackboneUnavailableError(WeightsUnavailableError, OSError):
    """A backbone neither cached nor downloadable. An OSError too, as transformers' own error
    was: callers that catch OSError around `load_backbone` (extract, train, batch) still do."""


def missing_message(subject: str, missing: Sequence[MissingPiece]) -> str:
    """"<subject> could not be loaded; missing:" and each piece with its reason and fix."""
    lines = [f"{subject} could not be loaded; missing:"]
    for piece in missing:
        lines += [f"  - {piece.what}: {piece.reason}", f"    fix: {piece.fix}"]
    return "\n".join(lines)


# Files that are weights, never Hub repo ids: `--backbone ViT-L-14.pt` is a path.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_path(source: str) -> bool:
    """Whether a --backbone / --model value can only be meant as a local path: it starts
    with /, ./, ../ or ~, has a backslash or more than one /, or ends like a weights file.
    Such a value that does not exist is a missing file, never a Hub repo id to ask for."""
    return (source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or "\\" in source
            or source.count("/") > 1 or source.lower().endswith(WEIGHT_SUFFIXES))


def missing_path_piece(kind: str, source: str) -> MissingPiece:
    """A --backbone (`kind`) path that does not exist."""
    return MissingPiece(f"{kind} {source}", f"no such file or folder ({Path(source).expanduser().absolute()})",
                        "check the path: a save_pretrained folder of a CLIP model, or an OpenAI-format CLIP file "
                        "(.pt, .safetensors)")


# One attempt, a few seconds: offline, the Hub's own retries took 30 s before failing.
HUB_PROBE_TIMEOUT = 5.0


def hub_endpoint() -> str:
    """The Hub huggingface_hub downloads from (HF_ENDPOINT, read when it was imported)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when the Hub endpoint answers at all (any HTTP status); else why not."""
    url = hub_endpoint()
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "rine"})
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        return f"{url} unreachable ({getattr(e, 'reason', e)})"
    return None


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())


def backbone_fix(hub_id: str, revision: str | None) -> str:
    at = f" --revision {revision}" if revision else ""
    return (f"run once with the network (or `hf download {hub_id}{at}` on a connected machine and copy HF_HOME "
            f"over), or pass --backbone /path/to/{hub_id.split('/')[-1]}: a save_pretrained folder of {hub_id} "
            "or OpenAI's CLIP .pt file")


def backbone_problem(hub_id: str, revision: str | None) -> MissingPiece | None:
    """Why a Hub backbone cannot be loaded now, or None: it is cached, or (online) the Hub
    answers and it will be downloaded. Never more than one short request."""
    if backbone_cached(hub_id, revision):
        return None
    where = f"not in the Hugging Face cache (HF_HOME={_hf_home()})"
    if is_offline():
        reason = f"{where}, and offline mode is on (RINE_OFFLINE/HF_HUB_OFFLINE)"
    else:
        unreachable = hub_unreachable()
        if unreachable is None:
            return None
        reason = f"{where}, and {unreachable}"
    at = f" at revision {revision}" if revision else ""
    return MissingPiece(f"backbone {hub_id}{at}", reason, backbone_fix(hub_id, revision))


def _head_base_url() -> str:
    return os.environ.get("RINE_HEAD_BASE_URL", DEFAULT_HEAD_BASE_URL).rstrip("/")


def _sidbench_base_url() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return os.environ.get("RINE_SIDBENCH_BASE_URL", f"{endpoint}/{SIDBENCH_REPO}/resolve/main/rine").rstrip("/")


# The official heads are 1-43 MB; anything far larger is not one of them.
MAX_HEAD_BYTES = 256 * 1024 * 1024


def _download(url: str, dest: Path, expected_blob_sha1: str, timeout: float = 30.0) -> None:
    """Download to a temp file beside `dest`, verify the git blob id, then rename atomically."""
    from tqdm.auto import tqdm

    from .checkpoints import git_blob_sha1

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place only once verified (an exception leaves `dest` untouched).
    with atomic_file(dest, suffix=".part") as tmp:
        with open(tmp, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "rine"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                received = 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                    while chunk := response.read(1 << 16):
                        received += len(chunk)
                        if received > MAX_HEAD_BYTES:
                            raise WeightsUnavailableError(f"{url} sends more than {MAX_HEAD_BYTES} bytes: not a RINE head")
                        out.write(chunk)
                        bar.update(len(chunk))
        actual = git_blob_sha1(tmp)
        if actual != expected_blob_sha1:
            raise WeightsUnavailableError(
                f"downloaded {url} but its git blob id is {actual}, expected {expected_blob_sha1}; "
                "the file is corrupt or not the official one"
            )


def _head_piece(spec: PretrainedSpec, reason: str, backbone_given: str | None) -> MissingPiece:
    from .registry import BACKBONES

    home = rine_home()
    with_backbone = backbone_given or f"/path/to/{BACKBONES[spec.backbone].hub_id.split('/')[-1]}"
    return MissingPiece(
        f"head {spec.head_file}", reason,
        f"put {spec.head_file} (github.com/mever-team/rine/tree/main/ckpt) at {home / 'heads' / spec.head_file} "
        f"(RINE_HOME={home}), or pass it: rine detect --backbone {with_backbone} --head /path/to/{spec.head_file} "
        "IMAGES...; RINE_HEAD_BASE_URL points at a mirror",
    )


def resolve_pretrained(name: str, backbone_given: str | None = None, *, check_backbone: bool = True) -> Path:
    """Return the local checkpoint folder of a named model, downloading the head if needed.

    The folder holds our format (config.json + model.safetensors). The backbone is not
    downloaded here: `load_backbone` fetches it through the Hugging Face cache, or from
    `backbone_given`, the caller's own, which a missing-weights message then leaves out.
    WeightsUnavailableError names every piece that cannot be had (the head; a backbone
    neither cached nor downloadable; a `backbone_given` path that does not exist), each
    with its fix, before the backbone is loaded. `check_backbone=False`: the caller needs
    the head only (no backbone is checked).
    """
    if name not in PRETRAINED:
        raise UnknownNameError("pretrained model", name, list_pretrained())
    from .registry import BACKBONES

    spec = PRETRAINED[name]
    bb = BACKBONES[spec.backbone]
    folder = rine_home() / "models" / name
    head_path = rine_home() / "heads" / spec.head_file
    url = f"{_head_base_url()}/{spec.head_file}"
    converted = (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    missing: list[MissingPiece] = []
    # Every piece is checked before anything is fetched, so one message names all of them.
    if check_backbone and backbone_given is not None:
        if looks_like_path(backbone_given) and not Path(backbone_given).expanduser().exists():
            missing.append(missing_path_piece("backbone", backbone_given))
    elif check_backbone:
        # a backbone that is neither cached nor downloadable (offline, Hub unreachable): found
        # now, in a file stat or one short request, not after the head and 30 s of retries
        problem = backbone_problem(bb.hub_id, bb.revision)
        if problem is not None:
            missing.append(problem)
    if not converted and not head_path.is_file():
        if is_offline():
            missing.insert(0, _head_piece(spec, f"offline mode is on (RINE_OFFLINE/HF_HUB_OFFLINE); source {url}",
                                          backbone_given))
        else:
            failures = []
            for source in (url, f"{_sidbench_base_url()}/{spec.head_file}"):
                logger.info("downloading %s", source)
                try:
                    _download(source, head_path, spec.head_blob_sha1)
                    url = source
                    break
                except WeightsUnavailableError as e:  # a corrupt or oversized file: said as it is
                    failures.append(f"{source}: {e}")
                except (urllib.error.URLError, OSError, TimeoutError) as e:
                    failures.append(f"download from {source} failed ({getattr(e, 'reason', e)})")
            else:
                # each failure once, in the list (not also as a log warning)
                missing.insert(0, _head_piece(spec, "; ".join(failures), backbone_given))
    if missing:
        raise WeightsUnavailableError(missing_message(f"pretrained model {name!r}", missing), missing)
    if converted:
        return folder
    from .checkpoints import load_official_head, save_pretrained

    head = load_official_head(head_path, expected_blob_sha1=spec.head_blob_sha1)

    config = RINEConfig(
        backbone=spec.backbone,
        backbone_revision=BACKBONES[spec.backbone].revision,
        head=head.config,
        preprocess=PreprocessConfig(crop=spec.crop),
        name=spec.name,
        meta={"source": url, "head_blob_sha1": spec.head_blob_sha1, "description": spec.description, **spec.training},
    )
    # A private temp folder, renamed into place: concurrent first uses do not collide.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".", suffix=".tmp"))
    try:
        save_pretrained(head, config, tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / CONFIG_NAME).is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def backbone_missing_message(name: str, backbone: str, error: BaseException) -> str:
    """The message of a backbone that failed to load (`error`) for model `name`."""
    if isinstance(error, WeightsUnavailableError):
        return str(error)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    from .registry import BACKBONES

    spec = BACKBONES.get(backbone)
    hub_id = spec.hub_id if spec else backbone
    fix = backbone_fix(hub_id, spec.revision if spec else None) if spec or "/" in backbone else (
        "pass --backbone with a local save_pretrained folder or an OpenAI-format CLIP file")
    return missing_message(f"model {name!r}", [MissingPiece(f"backbone {backbone}", reason, fix)])


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local folder (huggingface_hub cache) of a Hub model repo holding a RINE
    checkpoint, config.json + model.safetensors, as `rine push` uploads it. Offline
    (RINE_OFFLINE / HF_HUB_OFFLINE) only the cache is looked at."""
    from huggingface_hub import hf_hub_download

    offline = is_offline()
    folder = None
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            folder = Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=offline)).parent
    except Exception as e:  # noqa: BLE001 - hub errors have many types (offline, not found, network)
        at = f" at revision {revision}" if revision else ""
        reason = ("offline mode (RINE_OFFLINE/HF_HUB_OFFLINE set) and not in the Hugging Face cache (HF_HOME)"
                  if offline else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise WeightsUnavailableError("\n".join([
            f"Hub model {repo_id!r}{at} could not be loaded; missing:",
            f"  - {CONFIG_NAME} + {WEIGHTS_NAME} of {repo_id}: {reason}",
            "To use a local copy instead: on a connected machine run",
            f"  hf download {repo_id} {CONFIG_NAME} {WEIGHTS_NAME} --local-dir DIR",
            "then pass --model DIR (or run once online so that the files land in HF_HOME).",
        ])) from None
    assert folder is not None
    return folder


def is_hub_model_id(name: str) -> bool:
    """`owner/name` that is neither a folder here, a path (`looks_like_path`) nor a named model."""
    return (name not in PRETRAINED and not Path(name).expanduser().exists() and not looks_like_path(name)
            and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None
            and ".." not in name)


def resolve_model(name_or_path: str, revision: str | None = None, backbone_given: str | None = None) -> Path:
    """A checkpoint folder, a Hub model id (`user/repo`) or a named model -> local folder
    (an unknown name: `resolve_pretrained`'s KeyError listing the known ones)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_hub_model_id(name_or_path):
        return resolve_hub_model(name_or_path, revision)
    if backbone_given is None:
        return resolve_pretrained(name_or_path)
    return resolve_pretrained(name_or_path, backbone_given=backbone_given)
