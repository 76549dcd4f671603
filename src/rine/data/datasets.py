"""Training layouts as ordered lists of `Item(path, label, set)`.

progan:  ROOT/{train,val}/<class>/{0_real,1_fake}/*   (CNNDetection; set = class)
ldm:     the latent-diffusion training set of grip-unina DMimageDetection, read as the
         reference reads it: ROOT/latent_diffusion_trainingset/{train,valid}/
         real_lsun.txt ("<class>_<file>" -> ROOT/train/<class>/0_real/<file>),
         real_coco.txt ("<id>.jpg" -> ROOT/coco/train2014/COCO_train2014_<id>.jpg, else
         val2014), and one folder of fakes per generator (set = the folder's name).
other:   any layout of `rine.data.layouts` (ufd20, synthbuster, genimage, folder, manifest),
         read through its `read_layout`; set = test-set name.

Orders are sorted, so the same data always gives the same item indices (and views).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .layouts import LAYOUTS as EVAL_LAYOUTS
from .layouts import read_layout
from .scan import image_files, is_hidden

logger = logging.getLogger(__name__)

TRAIN_LAYOUTS = ("progan", "ldm")


@dataclass(frozen=True)
class Item:
    """One input image: its path, label (0 real, 1 fake) and set (class or test-set name)."""

    path: str
    label: int
    set: str = ""


LAYOUTS = (*TRAIN_LAYOUTS, *[name for name in EVAL_LAYOUTS if name not in TRAIN_LAYOUTS])
PROGAN_CLASSES = ("airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                  "train", "tvmonitor")
LABEL_DIRS = {"0_real": 0, "1_fake": 1}


def _images(folder: Path) -> list[str]:
    """The image files directly in `folder`, sorted, hidden ones left out (the rule of `scan`)."""
    return image_files(folder, [p.name for p in folder.iterdir() if p.is_file()])


def progan_items(root: str | Path, split: str = "train", classes: Sequence[str] | None = None) -> list[Item]:
    """ROOT/<split>/<class>/{0_real,1_fake}; classes None = every class folder present."""
    base = Path(root).expanduser() / split
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist (expected ROOT/{split}/<class>/0_real|1_fake)")
    names = sorted(classes) if classes else sorted(p.name for p in base.iterdir() if p.is_dir() and not is_hidden(p.name))
    items = []
    for name in names:
        for label_dir, label in LABEL_DIRS.items():
            folder = base / name / label_dir
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} does not exist (class {name!r}, split {split!r})")
            items += [Item(str(p), label, name) for p in _images(folder)]
    return items


def ldm_items(root: str | Path, split: str = "train") -> list[Item]:
    """The latent-diffusion training set (split "train" or "valid"; "val" is accepted)."""
    root = Path(root).expanduser()
    split = "valid" if split == "val" else split
    base = root / "latent_diffusion_trainingset" / split
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist (expected the DMimageDetection latent-diffusion set)")
    items = []
    lsun = base / "real_lsun.txt"
    if lsun.is_file():
        for line in lsun.read_text(encoding="utf-8").split():
            cls, _, name = line.partition("_")
            items.append(Item(str(root / "train" / cls / "0_real" / name), 0, "lsun"))
    coco = base / "real_coco.txt"
    if coco.is_file():
        for name in coco.read_text(encoding="utf-8").split():
            path = root / "coco" / "train2014" / f"COCO_train2014_{name}"
            if not path.exists():
                path = root / "coco" / "val2014" / f"COCO_val2014_{name}"
            items.append(Item(str(path), 0, "coco"))
    for gen in sorted(p for p in base.iterdir() if p.is_dir() and not is_hidden(p.name)):
        items += [Item(str(p), 1, gen.name) for p in _images(gen)]
    return items


def layout_items(root: str | Path, layout: str, split: str = "train", classes: Sequence[str] | None = None) -> list[Item]:
    """Dispatch on the layout name (see the module docstring)."""
    if layout == "progan":
        return progan_items(root, split, classes)
    if layout == "ldm":
        return ldm_items(root, split)
    if layout in EVAL_LAYOUTS:
        # genimage has train/val splits of its own; the other test layouts have none.
        options = {"split": split} if layout == "genimage" else {}
        if classes:
            raise ValueError(f"--classes applies to the progan layout, not {layout!r}")
        result = read_layout(layout, root, **options)
        return [Item(str(p), int(y), ts.name) for ts in result.sets for p, y in ts.items]
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
