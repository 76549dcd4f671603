"""The input list of `rine batch`: one row per image, in a fixed order, as a pyarrow Table.

    inputs = list_inputs(["photos/", "more.csv", "s3://bucket/uploads/day.parquet"])
    inputs.table   # item, path, source, label, set, preset_error

INPUT may be an image file, a folder (walked recursively, sorted, as `rine detect` does), a
glob, or a manifest: a `.csv`, `.jsonl` or `.parquet` file with a `path` column and optional
`label` (int) and `set` (str) columns. Manifests and folders may be URIs that pyarrow's file
systems read (`s3://`, `gs://`, `file://`); only the listing is read here, never an image.

Columns: `item` the row's index (the identity used for exactly-once bookkeeping), `path` as
the user wrote it (what the output records carry, like `rine detect`'s; a byte of a file name
that is not UTF-8 is written `\\xe9`, as Parquet text must be UTF-8), `source` where workers read
it (the file system's bytes of an absolute path, or a URI; a relative path in a manifest is
relative to the manifest's folder; `source_path` gives it back as `str`), `preset_error` the reason a path could not even be listed (a folder
without permission), which becomes that input's error record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")

SCHEMA = pa.schema([
    ("item", pa.int64()),
    ("path", pa.string()),
    ("source", pa.binary()),  # file-system bytes: names need not be UTF-8
    ("label", pa.int64()),
    ("set", pa.string()),
    ("preset_error", pa.string()),
])


class ManifestError(ValueError):
    """An input list that cannot be read; `str()` names the file and the fix."""


def is_uri(path: str) -> bool:
    """`s3://b/k`, `gs://...`, `file:///...` (not a Windows drive letter such as `C:\\`)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").isalnum()


def display_path(path: str) -> str:
    """`path` as UTF-8 text: a file-name byte that is not UTF-8 (decoded by Python as a lone
    surrogate) is written as a `\\xNN` escape."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_path(source: bytes | str) -> str:
    """A `source` cell back as the `str` that `open()` takes (`os.fsdecode`)."""
    return os.fsdecode(source) if isinstance(source, bytes) else source


def is_manifest(path: str) -> bool:
    return PurePosixPath(path.split("?", 1)[0]).suffix.lower() in MANIFEST_SUFFIXES


@dataclass
class InputList:
    table: pa.Table  # SCHEMA, one row per input, `item` = 0..n-1
    has_label: bool  # some manifest gave a label column
    has_set: bool

    def __len__(self) -> int:
        return self.table.num_rows

    def sha1(self) -> str:
        """Fingerprint of the list (paths, labels, sets, listing errors): a rerun must list the same."""
        h = hashlib.sha1()
        cols = [self.table.column(c).to_pylist() for c in ("path", "label", "set", "preset_error")]
        for path, label, set_, err in zip(*cols, strict=True):
            h.update(f"{path}\t{label}\t{set_}\t{err or ''}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ManifestError(f"{uri}: pyarrow cannot open this URI ({e})") from None


def _read_manifest(path: str) -> pa.Table:
    """The raw table of a manifest file (local path or URI)."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = PurePosixPath(path).suffix.lower()
    try:
        if is_uri(path):
            fs, inner = _filesystem(path)
            stream = fs.open_input_file(inner) if suffix == ".parquet" else fs.open_input_stream(inner)
        else:
            stream = open(os.path.expanduser(path), "rb")
        with stream:
            if suffix == ".parquet":
                return pyarrow.parquet.read_table(stream)
            if suffix == ".jsonl":
                return pyarrow.json.read_json(stream)
            # path and set stay text (a set named 2024 is not a number)
            convert = pyarrow.csv.ConvertOptions(column_types={"path": pa.string(), "set": pa.string()})
            return pyarrow.csv.read_csv(stream, convert_options=convert)
    except FileNotFoundError:
        raise ManifestError(f"manifest {path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"manifest {path}: cannot be read as {suffix[1:]} ({str(e).splitlines()[0]})") from None


def _manifest_rows(path: str) -> tuple[list[str], list[str], list, list, bool, bool]:
    table = _read_manifest(path)
    if "path" not in table.column_names:
        raise ManifestError(f"manifest {path} has no `path` column (its columns: {', '.join(table.column_names)}); "
                            "name the column of image paths `path`")
    paths = [str(p) if p is not None else "" for p in table.column("path").to_pylist()]
    if any(not p for p in paths):
        row = paths.index("")
        raise ManifestError(f"manifest {path}, row {row + 1}: empty `path`")
    labels: list = [None] * len(paths)
    has_label = "label" in table.column_names
    if has_label:
        try:
            labels = table.column("label").cast(pa.int64()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ManifestError(f"manifest {path}: the `label` column must hold whole numbers (0 real, 1 fake)") from None
    has_set = "set" in table.column_names
    sets = [None if s is None else str(s) for s in table.column("set").to_pylist()] if has_set else [None] * len(paths)
    base = path.rsplit("/", 1)[0] if is_uri(path) else str(Path(os.path.expanduser(path)).resolve().parent)
    sources = []
    for p in paths:
        if is_uri(p) or os.path.isabs(os.path.expanduser(p)):
            sources.append(p if is_uri(p) else os.path.expanduser(p))
        else:
            sources.append(f"{base}/{p}" if is_uri(path) else os.path.join(base, p))
    return paths, sources, labels, sets, has_label, has_set


def _uri_listing(uri: str) -> list[str]:
    """Image files under a URI folder (recursive, sorted), or the URI itself."""
    import pyarrow.fs

    from ..data.images import is_image_path

    fs, inner = _filesystem(uri)
    info = fs.get_file_info(inner)
    if info.type != pyarrow.fs.FileType.Directory:
        return [uri]  # a file, or missing: its record says so
    scheme = uri.split("://", 1)[0]
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    names = sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File and is_image_path(f.path))
    return [f"{scheme}://{n}" if scheme != "file" else f"file://{n}" for n in names]


def list_inputs(inputs: list[str]) -> InputList:
    """The input list of INPUT arguments (see the module docstring), in their order."""
    from ..data.scan import expand_inputs

    paths: list[str] = []
    sources: list[str] = []
    labels: list = []
    sets: list = []
    errors: list = []
    has_label = has_set = False

    def add(path: str, source: str, label=None, set_=None, error=None) -> None:
        paths.append(path)
        sources.append(source)
        labels.append(label)
        sets.append(set_)
        errors.append(error)

    for arg in inputs:
        if is_manifest(arg) and (is_uri(arg) or not os.path.isdir(arg)):
            p, s, lab, st, hl, hs = _manifest_rows(arg)
            for row in zip(p, s, lab, st, strict=True):
                add(*row)
            has_label, has_set = has_label or hl, has_set or hs
        elif is_uri(arg):
            for uri in _uri_listing(arg):
                add(uri, uri)
        else:
            unreadable: list[tuple[str, str]] = []
            for path in expand_inputs([arg], unreadable):
                add(path, os.path.abspath(os.path.expanduser(path)))
            for path, reason in unreadable:
                add(path, os.path.abspath(path), error=reason)
    table = pa.table(
        [pa.array(range(len(paths)), pa.int64()), pa.array([display_path(p) for p in paths], pa.string()),
         pa.array([os.fsencode(s) for s in sources], pa.binary()),
         pa.array(labels, pa.int64()), pa.array(sets, pa.string()), pa.array(errors, pa.string())],
        schema=SCHEMA,
    )
    return InputList(table, has_label, has_set)
