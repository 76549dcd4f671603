"""Benchmark layouts on disk -> named test sets of (path, label), label 0 = real, 1 = fake.

    sets = read_layout("ufd20", "data/test")      # [TestSet("progan", ...), ...]

Readers (`LAYOUTS`): `ufd20` (CNNDetection + UniversalFakeDetect, the paper's 20 sets),
`synthbuster` (nine generators + RAISE real images), `genimage` (GenImage's
`<Generator>/<subdir>/{train,val}/{ai,nature}`), `folder` (any tree of real/fake
leaf folders), `manifest` (a CSV or JSONL list), the Parquet datasets of the Hub
(`parquet`, `opensdi`, `commfor`: see `rine.data.parquet`) and the generator-folder
benchmarks `aigibench`, `holmes`, `chameleon` (`SUITES_INFO` says what each holds). Labels always come from folder
NAMES, never from sorted order (sorting puts GenImage's `ai` before `nature`).

A missing class folder or one without images is a `LayoutError` naming the path;
a whole test set missing from a partially downloaded benchmark is a warning, and
the set is listed in `LayoutResult.missing`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scan import Skipped, is_hidden, walk_images
from .testsets import FAKE, REAL, LayoutError, LayoutResult, TestSet

logger = logging.getLogger(__name__)

REAL_NAMES = frozenset({"0_real", "real", "nature"})
FAKE_NAMES = frozenset({"1_fake", "fake", "ai"})

UFD20_SETS = (
    "progan", "stylegan", "stylegan2", "biggan", "cyclegan", "stargan", "gaugan",
    "deepfake", "seeingdark", "san", "crn", "imle",
    "guided", "ldm_200", "ldm_200_cfg", "ldm_100",
    "glide_100_27", "glide_50_27", "glide_100_10", "dalle",
)
# Diffusion sets share real folders (UniversalFakeDetect): guided uses ImageNet, the rest LAION.
UFD20_DIFFUSION_REAL = {
    "guided": "imagenet", "ldm_200": "laion", "ldm_200_cfg": "laion", "ldm_100": "laion",
    "glide_100_27": "laion", "glide_50_27": "laion", "glide_100_10": "laion", "dalle": "laion",
}
SYNTHBUSTER_SETS = (
    "dalle2", "dalle3", "stable-diffusion-1-3", "stable-diffusion-1-4", "stable-diffusion-2",
    "stable-diffusion-xl", "glide", "firefly", "midjourney-v5",
)
SYNTHBUSTER_REAL_DIRS = ("RAISEpng", "real_RAISE_1k")


# ---------------------------------------------------------------------------- helpers
def list_images(folder: Path, skipped: Skipped | None = None) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders (`.x`, `._x`)
    and files of other formats go to `skipped` (the rule of `scan`). Symbolic links are
    followed (datasets are often linked in), each real folder once."""

    def unreadable(error: OSError) -> None:
        raise error  # not skipped: the set's counts and metrics would silently change

    return list(walk_images(folder, follow_links=True, onerror=unreadable, skipped=skipped))


def _class_items(folder: Path, label: int, skipped: Skipped | None = None) -> list[tuple[str, int]]:
    if not folder.is_dir():
        raise LayoutError(f"missing folder: {folder}")
    paths = list_images(folder, skipped)
    if not paths:
        raise LayoutError(
            f"no images in {folder} (expected {'real' if label == REAL else 'fake'} images)"
        )
    return [(p, label) for p in paths]


def _real_fake(folder: Path, skipped: Skipped) -> list[tuple[str, int]]:
    """`folder/0_real` + `folder/1_fake`, or the same under each category subfolder."""
    if (folder / "0_real").is_dir() or (folder / "1_fake").is_dir():
        return _class_items(folder / "0_real", REAL, skipped) + _class_items(folder / "1_fake", FAKE, skipped)
    categories = sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name))
    if not categories:
        raise LayoutError(
            f"{folder} has neither 0_real/1_fake nor category subfolders holding them"
        )
    items: list[tuple[str, int]] = []
    for cat in categories:
        items += _class_items(cat / "0_real", REAL, skipped) + _class_items(cat / "1_fake", FAKE, skipped)
    return items


def _pick(wanted: list[str] | None, known: tuple[str, ...]) -> tuple[list[str], bool]:
    if wanted is None:
        return list(known), False
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise LayoutError(f"unknown test set(s) {unknown}; this layout has: {', '.join(known)}")
    return list(wanted), True


def _missing(name: str, path: Path, explicit: bool, missing: list[str]) -> None:
    if explicit:
        raise LayoutError(f"test set {name!r}: missing folder {path}")
    logger.warning("test set %s skipped: missing folder %s", name, path)
    missing.append(name)


def _nonempty(result: LayoutResult) -> LayoutResult:
    if not result.sets:
        raise LayoutError(f"no test set of layout {result.layout!r} found under {result.root}")
    return result


# ---------------------------------------------------------------------------- readers
def read_ufd20(root: Path, sets: list[str] | None = None) -> LayoutResult:
    """CNNDetection + UniversalFakeDetect test folder (the one holding progan/, ...,
    diffusion_datasets/); a parent folder holding `test/` is accepted too."""
    if not (root / "progan").exists() and (root / "test").is_dir():
        root = root / "test"
    names, explicit = _pick(sets, UFD20_SETS)
    out, missing = [], []
    for name in names:
        skipped = Skipped()
        if name in UFD20_DIFFUSION_REAL:
            fake = root / "diffusion_datasets" / name
            if not fake.is_dir():
                _missing(name, fake, explicit, missing)
                continue
            real = root / "diffusion_datasets" / UFD20_DIFFUSION_REAL[name] / "0_real"
            items = _class_items(real, REAL, skipped) + _class_items(fake / "1_fake", FAKE, skipped)
        else:
            folder = root / name
            if not folder.is_dir():
                _missing(name, folder, explicit, missing)
                continue
            items = _real_fake(folder, skipped)
        out.append(TestSet(name, items, skipped=skipped))
    return _nonempty(LayoutResult("ufd20", root, out, missing))


def read_synthbuster(
    root: Path, sets: list[str] | None = None, real_dir: str | Path | None = None
) -> LayoutResult:
    """Synthbuster generators under `root` (or `root/synthbuster`); real RAISE images from
    `real_dir`, else the first of RAISEpng/ or real_RAISE_1k/ in `root` or its parent."""
    gen_root = root / "synthbuster" if (root / "synthbuster").is_dir() else root
    if real_dir is not None:
        real = Path(real_dir)
    else:
        candidates = [
            base / d for base in (root, gen_root, root.parent) for d in SYNTHBUSTER_REAL_DIRS
        ]
        real = next((c for c in candidates if c.is_dir()), None)
        if real is None:
            raise LayoutError(
                f"no real (RAISE) folder: looked for {', '.join(SYNTHBUSTER_REAL_DIRS)} in {root} "
                f"and {root.parent}; pass real_dir (--real-dir)"
            )
    real_skipped = Skipped()
    real_items = _class_items(real, REAL, real_skipped)
    names, explicit = _pick(sets, SYNTHBUSTER_SETS)
    out, missing = [], []
    for name in names:
        folder = gen_root / name
        if not folder.is_dir():
            _missing(name, folder, explicit, missing)
            continue
        skipped = Skipped()
        skipped.update(real_skipped)  # each set holds the shared real images, and counts what they left out
        out.append(TestSet(name, real_items + _class_items(folder, FAKE, skipped), skipped=skipped))
    return _nonempty(LayoutResult("synthbuster", root, out, missing))


def read_genimage(root: Path, sets: list[str] | None = None, split: str = "val") -> LayoutResult:
    """GenImage: each `<Generator>/` holds `<subdir>/<split>/{ai,nature}` (or `<split>/` directly).
    One test set per generator folder; `ai` is fake, `nature` real, by name."""
    if not root.is_dir():
        raise LayoutError(f"missing folder: {root}")
    generators = sorted(d for d in root.iterdir() if d.is_dir() and not is_hidden(d.name))
    if sets is not None:
        known = {d.name for d in generators}
        unknown = [s for s in sets if s not in known]
        if unknown:
            raise LayoutError(f"test set(s) {unknown} not found under {root}")
        generators = [d for d in generators if d.name in sets]
    out = []
    for gen in generators:
        splits = [gen / split] if (gen / split).is_dir() else sorted(gen.glob(f"*/{split}"))
        splits = [s for s in splits if s.is_dir()]
        if not splits:
            raise LayoutError(
                f"generator {gen.name}: no {split}/ folder in {gen} or its subfolders"
            )
        items: list[tuple[str, int]] = []
        skipped = Skipped()
        for s in splits:
            items += _class_items(s / "nature", REAL, skipped) + _class_items(s / "ai", FAKE, skipped)
        out.append(TestSet(gen.name, items, skipped=skipped))
    return _nonempty(LayoutResult("genimage", root, out))


def read_folder(
    root: Path, sets: list[str] | None = None, max_depth: int = 6, set_depth: int = 1
) -> LayoutResult:
    """Any tree whose leaves are real folders (0_real, real, nature) and fake folders
    (1_fake, fake, ai), names matched case-insensitively, searched down to `max_depth`.

    A class folder's test set is its parent's path relative to `root`, cut to its first
    `set_depth` parts (so `progan/airplane/0_real` joins set `progan`); class folders
    right under `root` form one set named after `root`. A set with one class only is
    kept with a warning (its AP/AUC are undefined)."""
    if not root.is_dir():
        raise LayoutError(f"missing folder: {root}")
    grouped: dict[str, list[tuple[str, int]]] = {}
    found_class: dict[str, set[int]] = {}
    skipped: dict[str, Skipped] = {}

    def walk(folder: Path, depth: int) -> None:
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)):
            low = d.name.lower()
            if low in REAL_NAMES or low in FAKE_NAMES:
                label = REAL if low in REAL_NAMES else FAKE
                rel = folder.relative_to(root).parts
                name = "/".join(rel[:set_depth]) if rel else root.resolve().name
                grouped.setdefault(name, []).extend(_class_items(d, label, skipped.setdefault(name, Skipped())))
                found_class.setdefault(name, set()).add(label)
            elif depth < max_depth:
                walk(d, depth + 1)

    walk(root, 1)
    if sets is not None:
        unknown = [s for s in sets if s not in grouped]
        if unknown:
            raise LayoutError(
                f"test set(s) {unknown} not found under {root}; found: {sorted(grouped)}"
            )
        grouped = {k: v for k, v in grouped.items() if k in sets}
    for name, labels in found_class.items():
        if name in grouped and len(labels) == 1:
            which = "real" if REAL in labels else "fake"
            logger.warning("test set %s has only %s images (under %s)", name, which, root / name)
    out = [TestSet(name, sorted(items), skipped=skipped[name]) for name, items in sorted(grouped.items())]
    if not out:
        raise LayoutError(
            f"no real/fake folders ({'|'.join(sorted(REAL_NAMES))} / {'|'.join(sorted(FAKE_NAMES))}) "
            f"found under {root} within depth {max_depth}"
        )
    return LayoutResult("folder", root, out)


_LABELS = {
    "0": REAL,
    "real": REAL,
    "0_real": REAL,
    "nature": REAL,
    "1": FAKE,
    "fake": FAKE,
    "1_fake": FAKE,
    "ai": FAKE,
}


def read_manifest(path: Path, sets: list[str] | None = None) -> LayoutResult:
    """A CSV (header `path,label[,set]`), JSONL (`{"path", "label"[, "set"]}` per line) or
    JSON file (a list of such objects, or `{"items": [...]}`; JSONL in a `.json` file works
    too). Relative paths are relative to the manifest's folder; labels are 0/1, real/fake or
    0_real/1_fake/nature/ai; rows without a set join a set named after the file."""
    if not path.is_file():
        raise LayoutError(f"manifest not found: {path}")
    base, default_set = path.parent, path.stem
    rows: list[tuple[str, Any]] = []  # (where, row) -- where names the line or entry in errors
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as f:
        if suffix in (".jsonl", ".ndjson", ".json"):
            text = f.read()
            document = _json_document(path, text) if suffix == ".json" else None
            if document is not None:
                entries = document.get("items", [document]) if isinstance(document, dict) else document
                if not isinstance(entries, list):
                    raise LayoutError(f'{path}: a JSON manifest is a list of {{"path", "label"}} objects, '
                                      'or an object whose "items" is such a list')
                rows = [(f"{path}: entry {i}", row) for i, row in enumerate(entries, 1)]
            else:
                # "\n" only: JSON strings may hold U+2028 and the like, which splitlines() splits on
                for i, line in enumerate(text.split("\n"), 1):
                    if line.strip():
                        try:
                            rows.append((f"{path}:{i}", json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise LayoutError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise LayoutError(f"{path}: the CSV header must name the columns path,label[,set]")
            rows = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2)]
    grouped: dict[str, list[tuple[str, int]]] = {}
    for where, row in rows:
        if not isinstance(row, dict) or not row.get("path"):
            raise LayoutError(f"{where}: no path")
        label = _LABELS.get(str(row.get("label", "")).strip().lower())
        if label is None:
            raise LayoutError(f"{where}: label {row.get('label')!r} is not 0/1/real/fake")
        p = Path(str(row["path"])).expanduser()
        p = p if p.is_absolute() else base / p
        grouped.setdefault(str(row.get("set") or default_set), []).append((str(p), label))
    if sets is not None:
        grouped = {k: v for k, v in grouped.items() if k in sets}
    out = [TestSet(name, items) for name, items in grouped.items()]
    return _nonempty(LayoutResult("manifest", path, out))


def _json_document(path: Path, text: str) -> Any:
    """The file as one JSON document, or None where it is JSON Lines instead."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        first = next((line for line in text.split("\n") if line.strip()), "")
        if first.lstrip().startswith("[") or _json_document_error(first):
            # not JSON Lines either (a list, or an object spread over lines): say where it broke
            raise LayoutError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        return None


def _json_document_error(line: str) -> bool:
    try:
        json.loads(line)
        return False
    except json.JSONDecodeError:
        return True


# ---------------------------------------------------------------------------- Hub benchmarks
# Parquet suites are read by rine.data.parquet (pyarrow, the `eval` extra), imported lazily.
OPENSDI_SPLITS = ("sd15", "sd2", "sdxl", "sd3", "flux")  # the split names of nebula/OpenSDI_test
OPENSDI_LABELS = {"sd15": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux.1"}


@dataclass(frozen=True)
class SuiteInfo:
    """What a named benchmark is: where it lives, the counts its paper gives (None where we
    could not confirm them), its headline table (`table`: "opensdi" F1/Acc at 0.5,
    "balanced" balanced accuracy, or "paper" ACC/AP)."""

    hub: str | None
    counts: dict[str, tuple[int, int]] | None  # set -> (n_real, n_fake)
    table: str
    note: str


SUITES_INFO = {
    "opensdi": SuiteInfo(
        "nebula/OpenSDI_test", {s: (10_000, 10_000) for s in OPENSDI_SPLITS}, "opensdi",
        "OpenSDID (CVPR 2025) test splits: 10K real + 10K fake each (the authors' README; the Hub card lists 20,000 "
        "rows per split); train on nebula/OpenSDI_train split sd15 (100K + 100K)",
    ),
    "commfor": SuiteInfo(
        None, None, "paper",
        "Community Forensics eval set: Parquet with image_data bytes, label and model_name (one test set per "
        "generator); per-generator counts not confirmed here -- compare with the dataset card",
    ),
    "aigibench": SuiteInfo(None, None, "paper", "AIGIBench: <generator>/{0_real,1_fake}; counts not confirmed here"),
    "holmes": SuiteInfo(None, None, "paper", "AIGI-Holmes test set: <generator>/{0_real,1_fake}; counts not confirmed here"),
    "chameleon": SuiteInfo(
        None, None, "balanced",
        "Chameleon (AIDE, ICLR 2025) test folder {0_real,1_fake}: imbalanced, so its table is balanced accuracy; "
        "counts not confirmed here",
    ),
}


def _parquet_options(options: dict) -> dict:
    from .parquet import ParquetColumns

    columns = options.pop("columns", None) or ParquetColumns()
    return {"columns": columns, "name": options.pop("name", None), "splits": options.pop("splits", None)}


def read_parquet(root: Path, sets: list[str] | None = None, **options) -> LayoutResult:
    """Any Parquet image dataset (a snapshot_download folder): see `rine.data.parquet`."""
    from .parquet import read_parquet_layout

    return read_parquet_layout(root, sets, **_parquet_options(options))


def read_opensdi(root: Path, sets: list[str] | None = None, **options) -> LayoutResult:
    """OpenSDID's test splits (sd15, sd2, sdxl, sd3, flux), one set each, whole splits.
    Partial (inpainted) and global fakes are both label 1; masks are not read."""
    from .hub import split_files
    from .parquet import read_parquet_layout

    opts = _parquet_options(options)
    names, explicit = _pick(sets, OPENSDI_SPLITS)
    present = split_files(root)
    missing: list[str] = []
    for name in list(names):
        if name not in present:
            _missing(name, root / "data" / f"{name}-*.parquet", explicit, missing)
            names.remove(name)
    if not names:
        raise LayoutError(f"no OpenSDID split ({', '.join(OPENSDI_SPLITS)}) under {root}; it has: {', '.join(present)}")
    result = read_parquet_layout(root, splits=names, name=opts["name"], columns=opts["columns"], layout="opensdi")
    result.missing = missing
    return result


def read_commfor(root: Path, sets: list[str] | None = None, **options) -> LayoutResult:
    """Community Forensics' eval set: `image_data` bytes, `label`, one set per `model_name`."""
    from .parquet import ParquetColumns, read_parquet_layout

    opts = _parquet_options(options)
    given = opts["columns"]
    columns = ParquetColumns(image=given.image or "image_data", label=given.label, set=given.set or "model_name",
                             key=given.key, label_map=given.label_map)
    return read_parquet_layout(root, sets, splits=opts["splits"], name=opts["name"], columns=columns, layout="commfor")


def _generator_folders(layout: str) -> Callable[..., LayoutResult]:
    def read(root: Path, sets: list[str] | None = None, **options) -> LayoutResult:
        result = read_folder(root, sets, **options)
        result.layout = layout
        return result

    read.__doc__ = f"{layout}: <generator>/{{0_real,1_fake}} folders, one test set per generator."
    return read


LAYOUTS: dict[str, Callable[..., LayoutResult]] = {
    "ufd20": read_ufd20,
    "synthbuster": read_synthbuster,
    "genimage": read_genimage,
    "folder": read_folder,
    "manifest": read_manifest,
    "parquet": read_parquet,
    "opensdi": read_opensdi,
    "commfor": read_commfor,
    "aigibench": _generator_folders("aigibench"),
    "holmes": _generator_folders("holmes"),
    "chameleon": _generator_folders("chameleon"),
}


def read_layout(layout: str, root: str | Path, **options) -> LayoutResult:
    """Named test sets under `root` for `layout` (a key of `LAYOUTS`); options go to the reader."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    try:
        return LAYOUTS[layout](Path(root).expanduser(), **options)
    except OSError as e:  # a folder that cannot be listed: a set would silently lose images
        raise LayoutError(f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e)) from None
