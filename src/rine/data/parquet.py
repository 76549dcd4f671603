"""Parquet image datasets: rows -> test sets, images streamed row group by row group.

    sets = read_parquet_dataset({"sd15": [Path("data/sd15-00000-of-00002.parquet"), ...]},
                                name="nebula/OpenSDI_test", root=snapshot)
    for source in sets[0].source.iter_images():   # bytes, a path, or a RowError, in item order
        image = open_source(source)

The layout `huggingface_hub.snapshot_download` leaves (`data/<split>-NNNNN-of-NNNNN.parquet`,
or split folders) is found by `rine.data.hub.split_files`. Images come from an `image`
struct column (`{"bytes", "path"}`, what `datasets.Image` writes) or a plain binary
column; only the label/set/key columns are read to list the rows, and images are read
later, a few rows at a time (`ParquetFile(buffer_size=...)`, `iter_batches`), so memory
stays bounded whatever the size of a file or of its row groups. Decoding is left to the
callers' workers (`open_source` -> `rine.data.images.load_image`, with its limits), so a
corrupt image is that row's error, never a crash of the reader.

A row's identity (the `path` of its prediction record) is `<dataset>/<split>/<file>#<row>`
with `<file>` relative to the dataset root and `<row>` its index in the file; its seed key
(perturbations) is the same without `<dataset>/`, so a local copy and the Hub id agree.
pyarrow is imported lazily: it is in the `eval` extra.

Plugging a command in: `rine.cli.hubdata.add_hub_options(parser)` adds --hub, --splits and
the column options, `rine.cli.hubdata.read_sets(args, suite, options)` gives the
`LayoutResult`; for each `TestSet`, `rine.evaluation.scoring.item_sources(ts)` yields what a
decoding worker opens (`open_source`) and `set_keys(ts, root)` the seed keys, whether the
set comes from folders or Parquet (`ts.source` is None for folders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from .testsets import FAKE, REAL, LayoutError, LayoutResult, TestSet

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_data", "img", "image_bytes", "bytes")
KEY_COLUMNS = ("key", "id", "image_id")
# Labels as datasets' ClassLabel stores them (ints) and as people write them.
DEFAULT_LABELS = {"0": REAL, "1": FAKE, "real": REAL, "fake": FAKE, "0_real": REAL, "1_fake": FAKE,
                  "nature": REAL, "ai": FAKE, "false": REAL, "true": FAKE}
READ_ROWS = 16  # rows per batch when streaming images: a few images in memory, not a row group
READ_BUFFER = 1 << 20  # bytes: pyarrow reads column chunks through a buffer of this size


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns hold what. `image` None: the first of IMAGE_COLUMNS present; `key`
    None: the first of KEY_COLUMNS present ("" for none); `set` None: one set per split.
    `label_map` maps a label's text (ints as "0", "1") to 0 real / 1 fake."""

    image: str | None = None
    label: str = "label"
    set: str | None = None
    key: str | None = None
    label_map: dict[str, int] | None = None


@dataclass(frozen=True)
class RowError:
    """A row without a usable image (null, or a path outside the dataset); `open_source`
    turns it into that row's ImageLoadError in the decoding worker."""

    message: str
    kind: str = "empty"


@dataclass
class ParquetSource:
    """Where the images of one test set live: `rows[i]` = (file index, row in file) of item i."""

    files: list[str]
    rows: list[tuple[int, int]]
    image_column: list[str]  # per file (files of one set may differ)
    base: str  # folder that relative image paths (a struct's `path`) are resolved in
    seed_keys: list[str] = field(default_factory=list)
    row_keys: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, stop: int) -> ParquetSource:
        """The first `stop` items."""
        return ParquetSource(self.files, self.rows[:stop], self.image_column, self.base, self.seed_keys[:stop],
                             None if self.row_keys is None else self.row_keys[:stop])

    def extra(self, index: int) -> dict:
        """Fields a prediction record of item `index` carries besides the common ones."""
        if self.row_keys is None:
            return {}
        return {"row_key": self.row_keys[index]}

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[bytes | str | RowError]:
        """The image of each item start..stop, in item order: encoded bytes, a file path
        (struct rows holding a path only) or a RowError. Reads only the row groups that
        hold wanted rows, READ_ROWS rows at a time."""
        import pyarrow.parquet as pq

        stop = len(self.rows) if stop is None else stop
        i = start
        while i < stop:
            fi = self.rows[i][0]
            j = i
            while j < stop and self.rows[j][0] == fi:  # a run of items from one file
                j += 1
            wanted = [r for _, r in self.rows[i:j]]
            got = _stream(pq, self.files[fi], self.image_column[fi], wanted, self.base)
            for r in wanted:
                got_r, image = next(got)
                if got_r != r:  # a bug, not bad data: rows of a file are listed in ascending order
                    raise RuntimeError(f"parquet reader out of step: row {got_r}, expected {r}")
                yield image
            i = j


def _stream(pq, path: str, column: str, rows: list[int], base: str) -> Iterator[tuple[int, bytes | str | RowError]]:
    pf = pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
    meta = pf.metadata
    starts, offset = [], 0
    for g in range(meta.num_row_groups):
        starts.append(offset)
        offset += meta.row_group(g).num_rows
    wanted = set(rows)
    last = max(rows, default=-1)
    for g in range(meta.num_row_groups):
        first, n = starts[g], meta.row_group(g).num_rows
        if first > last:
            break
        if not any(first <= r < first + n for r in rows):
            continue  # no wanted row here: the group is never read
        row = first
        for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=[g], columns=[column], use_threads=False):
            values = batch.column(0)
            for k in range(len(values)):
                if row + k in wanted:
                    yield row + k, _image_of(values[k], path, row + k, column, base)
            row += len(values)
            if row > last:  # the rest of the group holds no wanted row
                break


def _image_of(value, path: str, row: int, column: str, base: str) -> bytes | str | RowError:
    """One cell of the image column -> encoded bytes, a checked path or a RowError."""
    where = f"{path}#{row}"
    v = value.as_py()
    if isinstance(v, dict):  # datasets.Image: {"bytes": ..., "path": ...}
        if v.get("bytes"):
            return v["bytes"]
        if v.get("path"):
            return _checked_path(v["path"], base, where)
        return RowError(f"{where}: no image (column {column!r} has neither bytes nor a path)")
    if isinstance(v, (bytes, bytearray)):
        return bytes(v) if v else RowError(f"{where}: empty image bytes in column {column!r}")
    if v is None:
        return RowError(f"{where}: no image (column {column!r} is null)")
    return RowError(f"{where}: column {column!r} holds {type(v).__name__}, not image bytes", "not_image")


def _checked_path(rel: str, base: str, where: str) -> str | RowError:
    """A struct's `path`, resolved in `base`; one leading outside it is refused (a dataset
    must not make us read arbitrary files)."""
    base_real = os.path.realpath(base)
    full = os.path.realpath(os.path.join(base_real, rel))
    if os.path.commonpath([base_real, full]) != base_real:
        return RowError(f"{where}: image path {rel!r} lies outside the dataset folder {base}", "unreadable")
    return full


def open_source(
    source: str | Path | bytes | RowError,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
):
    """`load_image` for an item source (a path, encoded bytes or a RowError) -> RGB PIL image.
    Runs in the decoding workers; raises ImageLoadError for an unusable row."""
    if isinstance(source, RowError):
        raise ImageLoadError(source.message, source.kind)
    return load_image(source, max_pixels=max_pixels, max_bytes=max_bytes)


# ---------------------------------------------------------------------------- listing
def _schema_columns(pq, path: str) -> list[str]:
    return list(pq.ParquetFile(path).schema_arrow.names)


def _pick_column(names: Sequence[str], given: str | None, candidates: Sequence[str], what: str, path: str,
                 required: bool = True) -> str | None:
    if given:
        if given not in names:
            raise LayoutError(f"{path}: no {what} column {given!r}; its columns: {', '.join(names)}")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise LayoutError(f"{path}: no {what} column (looked for {', '.join(candidates)}); its columns: "
                          f"{', '.join(names)}; name it with --{what}-column")
    return found


def parse_label_map(text: str | None) -> dict[str, int] | None:
    """`"real=0,fake=1,sd=1"` (or `0:0,...`) -> {"real": 0, "fake": 1, "sd": 1}."""
    if not text:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.replace(":", "=").rpartition("=")
        if not sep or value.strip() not in ("0", "1"):
            raise LayoutError(f"--label-map {part.strip()!r}: write VALUE=0 (real) or VALUE=1 (fake), comma-separated")
        out[name.strip().lower()] = int(value)
    return out


def _label_of(value, label_map: dict[str, int] | None, where: str, column: str) -> int:
    text = str(value).strip().lower() if not isinstance(value, bool) else str(int(value))
    table = label_map if label_map is not None else DEFAULT_LABELS
    if text in table:
        return table[text]
    raise LayoutError(f"{where}: label {value!r} in column {column!r} is not 0/1/real/fake; map the dataset's "
                      "labels with --label-map VALUE=0,VALUE=1")


def read_parquet_dataset(
    splits: dict[str, list[Path]],
    *,
    name: str,
    root: Path,
    columns: ParquetColumns | None = None,
    sets: list[str] | None = None,
) -> list[TestSet]:
    """Test sets of Parquet files grouped by split: one set per split, or per value of
    `columns.set` (named `<split>/<value>` when there are several splits). Only the label,
    set and key columns are read here. Each TestSet's `source` streams its images."""
    import pyarrow.parquet as pq

    columns = columns or ParquetColumns()
    grouped: dict[str, dict] = {}
    for split, files in splits.items():
        for path in files:
            spath = str(path)
            try:
                names = _schema_columns(pq, spath)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
                raise LayoutError(f"{spath}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
            image_col = _pick_column(names, columns.image, IMAGE_COLUMNS, "image", spath)
            label_col = _pick_column(names, columns.label, (), "label", spath)
            set_col = _pick_column(names, columns.set, (), "set", spath) if columns.set else None
            key_col = (None if columns.key == "" else
                       _pick_column(names, columns.key, KEY_COLUMNS, "key", spath, required=False))
            wanted = [c for c in (label_col, set_col, key_col) if c]
            rel = _relative(spath, root)
            pf = pq.ParquetFile(spath, buffer_size=READ_BUFFER, pre_buffer=False)
            row = 0
            for batch in pf.iter_batches(batch_size=4096, columns=wanted, use_threads=False):
                cols = {c: batch.column(c).to_pylist() for c in wanted}
                for k in range(batch.num_rows):
                    r = row + k
                    where = f"{spath}#{r}"
                    label = _label_of(cols[label_col][k], columns.label_map, where, label_col)
                    set_name = split
                    if set_col:
                        value = cols[set_col][k]
                        set_name = str(value) if len(splits) == 1 else f"{split}/{value}"
                    g = grouped.setdefault(set_name, {"files": [], "index": {}, "items": [], "rows": [],
                                                      "cols": [], "seed": [], "keys": [], "has_key": False})
                    if spath not in g["index"]:
                        g["index"][spath] = len(g["files"])
                        g["files"].append(spath)
                        g["cols"].append(image_col)
                    seed_key = f"{split}/{rel}#{r}"
                    g["items"].append((f"{name}/{seed_key}", label))
                    g["rows"].append((g["index"][spath], r))
                    g["seed"].append(seed_key)
                    g["keys"].append(None if key_col is None or cols[key_col][k] is None else str(cols[key_col][k]))
                    g["has_key"] = g["has_key"] or key_col is not None
                row += batch.num_rows
    if sets is not None:
        unknown = [s for s in sets if s not in grouped]
        if unknown:
            raise LayoutError(f"test set(s) {unknown} not found in {name}; found: {', '.join(sorted(grouped))}")
        grouped = {k: grouped[k] for k in sets}
    out = []
    for set_name, g in grouped.items():
        source = ParquetSource(g["files"], g["rows"], g["cols"], str(root), g["seed"],
                               g["keys"] if g["has_key"] else None)
        ts = TestSet(set_name, g["items"], source=source)
        if ts.n_real == 0 or ts.n_fake == 0:
            logger.warning("test set %s has only %s images", set_name, "fake" if ts.n_real == 0 else "real")
        out.append(ts)
    return out


def _relative(path: str, root: Path) -> str:
    """`path` relative to `root` as written (not resolved: a Hub snapshot's files are links
    into its blob store), else its file name."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return Path(path).name


def read_parquet_layout(
    root: Path,
    sets: list[str] | None = None,
    splits: list[str] | None = None,
    name: str | None = None,
    columns: ParquetColumns | None = None,
    layout: str = "parquet",
) -> LayoutResult:
    """A local dataset folder (a snapshot_download folder, or any folder of Parquet files):
    splits from the dataset card's `configs`, `data/<split>-NNNNN-of-NNNNN.parquet` names
    or split folders (see `rine.data.hub.split_files`). Without a set column, `sets` picks
    splits; `splits` always does."""
    from .hub import split_files

    columns = columns or ParquetColumns()
    if splits is None and sets is not None and columns.set is None:
        splits, sets = sets, None
    found = split_files(root, splits)
    result = read_parquet_dataset(found, name=name or str(root), root=root, columns=columns, sets=sets)
    if not result:
        raise LayoutError(f"no rows in the Parquet files of {root}")
    return LayoutResult(layout, root, result)


def merge_sources(sources: Sequence[ParquetSource]) -> ParquetSource:
    """One source over the items of several, in order (a training store of several splits)."""
    files: list[str] = []
    cols: list[str] = []
    rows: list[tuple[int, int]] = []
    seeds: list[str] = []
    keys: list[str | None] = []
    has_keys = any(s.row_keys is not None for s in sources)
    for s in sources:
        offset = len(files)
        files += s.files
        cols += s.image_column
        rows += [(fi + offset, r) for fi, r in s.rows]
        seeds += s.seed_keys
        keys += s.row_keys if s.row_keys is not None else [None] * len(s.rows)
    base = sources[0].base if sources else ""
    return ParquetSource(files, rows, cols, base, seeds, keys if has_keys else None)
