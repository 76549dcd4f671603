"""Hugging Face Hub datasets: a repo id or a local snapshot folder -> Parquet files per split.

    root = download_dataset("nebula/OpenSDI_test", splits=["sd15"])   # only data/sd15-* files
    files = split_files(root, ["sd15"])                               # {"sd15": [Path, ...]}

Splits are read from the dataset card's YAML `configs` (`data_files: [{split, path}]`, the
default config, else the first) when it has them, else from file names
(`data/<split>-NNNNN-of-NNNNN.parquet`, what `push_to_hub` writes) or split folders
(`<split>/*.parquet`, `data/<split>/*.parquet`). Downloads go through huggingface_hub into
its cache (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` apply), only the files of the splits asked
for; offline (`HF_HUB_OFFLINE` / `RINE_OFFLINE`) only the cache is looked at, and a split
that is not there stops with a message naming it and the local way. huggingface_hub is
imported lazily.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path

from .testsets import LayoutError

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DatasetUnavailableError(LayoutError):
    """A Hub dataset (or some of its splits) is neither cached nor downloadable."""


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def card_splits(root: Path) -> dict[str, list[str]] | None:
    """{split: [glob pattern relative to root]} from the dataset card's `configs`, or None."""
    card = root / CARD_NAME
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml  # a dependency of huggingface_hub

    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as e:
        logger.warning("%s: unreadable YAML header (%s); splits are read from file names", card, e)
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    chosen = next((c for c in configs if isinstance(c, dict) and (c.get("default") or c.get("config_name") == "default")),
                  configs[0])
    data_files = chosen.get("data_files") if isinstance(chosen, dict) else None
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                    and isinstance(data_files[0], dict)):
        data_files = [{"split": "train", "path": data_files}]
    if not isinstance(data_files, list):
        return None
    out: dict[str, list[str]] = {}
    for entry in data_files:
        if isinstance(entry, dict) and entry.get("split") and entry.get("path"):
            paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            out.setdefault(str(entry["split"]), []).extend(str(p) for p in paths)
    return out or None


def _glob(root: Path, pattern: str) -> list[Path]:
    # fnmatch over the tree, as the Hub's patterns: `*` may cross folders (data/sd15-*)
    return sorted(p for p in root.rglob("*.parquet") if fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern))


def split_patterns(root: Path | None, splits: list[str] | None, card: dict[str, list[str]] | None) -> list[str]:
    """allow_patterns for the files of `splits` (all splits: every Parquet file)."""
    if splits is None:
        return ["*.parquet", "**/*.parquet"]
    out: list[str] = []
    for s in splits:
        if card is not None and s in card:
            out += card[s]
        else:
            out += [f"data/{s}-*.parquet", f"{s}-*.parquet", f"{s}/*.parquet", f"{s}/**/*.parquet",
                    f"data/{s}/*.parquet", f"data/{s}/**/*.parquet"]
    return out


def split_files(root: Path, splits: list[str] | None = None) -> dict[str, list[Path]]:
    """{split: sorted Parquet files} of a local dataset folder; `splits` None: all found.
    A split asked for and not found is a LayoutError listing the splits there are."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"missing folder: {root}")
    card = card_splits(root)
    found: dict[str, list[Path]] = {}
    if card is not None:
        for split, patterns in card.items():
            files = sorted({p for pat in patterns for p in _glob(root, pat)})
            if files:
                found[split] = files
    else:
        for p in sorted(root.rglob("*.parquet")):
            if any(part.startswith(".") for part in p.relative_to(root).parts):
                continue  # .cache/ of a local_dir download
            m = _SHARD.match(p.name)
            rel = p.relative_to(root).parts
            if m:
                split = m.group("split")
            elif len(rel) >= 2 and rel[0] != "data":
                split = rel[0]
            elif len(rel) >= 3:
                split = rel[1]  # data/<split>/x.parquet
            else:
                split = p.stem
            found.setdefault(split, []).append(p)
    if not found:
        raise LayoutError(f"no Parquet files under {root}")
    if splits is None:
        return found
    missing = [s for s in splits if s not in found]
    if missing:
        raise LayoutError(f"split(s) {missing} not found under {root}; it has: {', '.join(found)}")
    return {s: found[s] for s in splits}


def _offline() -> bool:
    """The switches `rine.model.pretrained.is_offline` reads (the data layer does not import model)."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("RINE_OFFLINE", "HF_HUB_OFFLINE"))


def download_dataset(repo_id: str, revision: str | None = None, splits: list[str] | None = None) -> Path:
    """The local snapshot folder of Hub dataset `repo_id` holding (at least) `splits`
    (None: all), downloaded into the huggingface_hub cache where needed."""
    if not is_repo_id(repo_id):
        raise LayoutError(f"--hub {repo_id!r} is not a Hub dataset id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _offline()
    what = f"dataset {repo_id}" + (f" at revision {revision}" if revision else "")

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns,
                                          local_files_only=offline))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
            raise DatasetUnavailableError(_missing_message(repo_id, revision, splits, offline, e)) from None
        except HfHubHTTPError as e:
            raise DatasetUnavailableError(f"{what}: {str(e).splitlines()[0]}") from None

    card_root = fetch([CARD_NAME])
    root = fetch([CARD_NAME, *split_patterns(card_root, splits, card_splits(card_root))])
    try:
        split_files(root, splits)
    except LayoutError as e:
        if offline:
            raise DatasetUnavailableError(_missing_message(repo_id, revision, splits, offline, e)) from None
        raise
    return root


def _missing_message(repo_id: str, revision: str | None, splits: list[str] | None, offline: bool,
                     error: BaseException) -> str:
    which = f"split(s) {', '.join(splits)} of" if splits else "the Parquet files of"
    at = f" at revision {revision}" if revision else ""
    reason = "offline mode (HF_HUB_OFFLINE/RINE_OFFLINE set) and not in the Hugging Face cache (HF_HOME)" if offline \
        else f"download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    include = " ".join(f"--include '{p}'" for p in split_patterns(None, splits, None)[:1]) if splits else ""
    return "\n".join([
        f"Hub dataset {repo_id!r}{at} could not be loaded; missing:",
        f"  - {which} dataset {repo_id}: {reason}",
        "To use a local copy instead: on a connected machine run",
        f"  hf download {repo_id} --repo-type dataset {include} --local-dir DIR".replace("  --", " --"),
        "then pass --root DIR (the folder holding README.md and data/) instead of --hub,",
        "or run once online so that the files land in the Hugging Face cache (HF_HOME).",
    ])
