"""Which files a folder scan takes: one rule for every command that walks folders.

    skipped = Skipped()
    paths = list(walk_images("photos/", skipped=skipped))
    skipped.summary()        # "3 files skipped: 2 hidden, 1 .svg (vector image, not supported)"

The rule: names starting with "." are hidden and left out, folders included (macOS
`._photo.jpg` AppleDouble files, `.DS_Store`, `.git/`, `.cache/`); of the rest, files
with an image extension (`images.IMAGE_EXTENSIONS`) are taken. Nothing is left out
silently: `Skipped` counts what a scan passed over, by reason. A file named on the command
line is not scanned: it is decoded whatever its name, and fails with a reason if it
cannot be (see `images.load_image`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .images import UNSUPPORTED_EXTENSIONS, is_image_path

__all__ = ["Skipped", "image_files", "is_hidden", "walk_images"]

HIDDEN = "hidden"


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with "."); "." and ".." are not names."""
    return name.startswith(".") and name not in (".", "..")


@dataclass
class Skipped:
    """What folder scans passed over: {reason: [path]}; a reason is "hidden" or an
    extension (".svg", "no extension")."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: str, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    def update(self, other: Skipped) -> None:
        """Add what another scan passed over (e.g. a real folder shared by several test sets)."""
        for reason, paths in other.by_reason.items():
            self.by_reason.setdefault(reason, []).extend(paths)

    def counts(self) -> dict[str, int]:
        """{reason: how many}, most frequent first (as in `summary`)."""
        return {reason: len(paths) for reason, paths in self._ordered()}

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def summary(self) -> str:
        """One line: how many files were skipped, most frequent reason first ("" if none)."""
        if not self.total:
            return ""
        parts = []
        for reason, paths in self._ordered():
            why = UNSUPPORTED_EXTENSIONS.get(reason)
            parts.append(f"{len(paths)} {reason}" + (f" ({why})" if why else ""))
        return f"{self.total} {'file' if self.total == 1 else 'files'} skipped: {', '.join(parts)}"

    def _ordered(self) -> list[tuple[str, list[str]]]:
        return sorted(self.by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def _reason(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix or "no extension"


def image_files(root: str | Path, names: list[str], skipped: Skipped | None = None) -> list[str]:
    """The image files among `names` (file names in the folder `root`), sorted; the others go to `skipped`."""
    out = []
    for name in sorted(names):
        path = str(Path(root) / name)
        if is_hidden(name):
            reason = HIDDEN
        elif is_image_path(name):
            out.append(path)
            continue
        else:
            reason = _reason(name)
        if skipped is not None:
            skipped.add(path, reason)
    return out


def walk_images(
    folder: str | Path,
    *,
    follow_links: bool = False,
    onerror: Callable[[OSError], None] | None = None,
    skipped: Skipped | None = None,
) -> Iterator[str]:
    """Image files under `folder`, recursively, in sorted order (folders sorted, files
    sorted within each), by the rule of this module. With `follow_links`, symbolic links
    to folders are followed, each real folder once (a link cycle ends there).
    `onerror(OSError)` gets the folders that cannot be listed (os.walk's default: ignored).
    A hidden folder counts as one hidden entry in `skipped` (its files are not listed)."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=follow_links, onerror=onerror):
        if follow_links:
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
        kept = []
        for d in sorted(dirs):
            if is_hidden(d):
                if skipped is not None:
                    skipped.add(str(Path(root) / d) + os.sep, HIDDEN)
            else:
                kept.append(d)
        dirs[:] = kept
        yield from image_files(root, files, skipped)


def expand_inputs(
    inputs: list[str], unreadable: list[tuple[str, str]], skipped: Skipped | None = None
) -> Iterator[str]:
    """Files as given; folders walked recursively for image files (sorted; hidden files and
    folders left out, by the rule of `rine.data.scan`); globs expanded. A path that does
    not exist is yielded as is, so that it is reported as an error. Folders that cannot be
    listed, paths that cannot be examined (no permission) and globs that match nothing are
    appended to `unreadable` as (path, reason); the files a folder scan passes over go to
    `skipped`."""

    def problem(path: str, error: OSError) -> None:
        kind = "folder" if os.path.isdir(path) else "path"
        unreadable.append((path, f"cannot read {kind}: {error.strerror or error}"))

    for item in inputs:
        path = Path(item).expanduser()
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except OSError as e:  # a path inside a folder without permission
            problem(item, e)
            continue
        if is_dir:
            yield from walk_images(path, onerror=lambda e, top=str(path): problem(e.filename or top, e),
                                   skipped=skipped)
        elif exists:
            yield str(path)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                unreadable.append((item, "no file matches this pattern"))
            for m in matches:
                if os.path.isdir(m):
                    yield from expand_inputs([m], unreadable, skipped)
                else:
                    yield m
        else:
            yield item
