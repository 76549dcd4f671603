"""Small trees of generated images in the layouts the readers expect (ufd20, ProGAN training
folders), for the layout, evaluation, extraction and training tests."""

from __future__ import annotations

from pathlib import Path

from conftest import write_image

# file names that must be ordinary: several dots, upper-case extensions, non-ASCII
ODD_NAMES = ("a.b.c.final.PNG", "фото_ü.JPG", "x.jpeg", "plain.png")


def make_files(folder: Path, n: int, seed: int = 0, size=(8, 8)) -> list[Path]:
    """n images with the odd names cycled (png-encoded whatever the extension's case)."""
    out = []
    for i in range(n):
        name = ODD_NAMES[i % len(ODD_NAMES)]
        stem, _, ext = name.rpartition(".")
        fmt = "JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG"
        out.append(write_image(folder / f"{i:02d}.{stem}.{ext}", size=size, seed=seed + i, fmt=fmt))
    return out


def build_ufd20(
    root: Path, sets=("progan", "biggan", "guided", "ldm_200", "dalle"), size=(8, 8)
) -> dict:
    """A small ufd20 tree; returns {set: (n_real, n_fake)} expected by the layout's rules."""
    expected = {}
    if "progan" in sets:  # per-category subfolders
        for j, cat in enumerate(("airplane", "cat")):
            make_files(root / "progan" / cat / "0_real", 2 + j, size=size)
            make_files(root / "progan" / cat / "1_fake", 1 + j, size=size)
        expected["progan"] = (5, 3)
    if "biggan" in sets:
        make_files(root / "biggan" / "0_real", 3, size=size)
        make_files(root / "biggan" / "1_fake", 2, size=size)
        expected["biggan"] = (3, 2)
    dd = root / "diffusion_datasets"
    make_files(dd / "imagenet" / "0_real", 2, size=size)
    make_files(dd / "laion" / "0_real", 3, size=size)
    for i, name in enumerate(s for s in sets if s in ("guided", "ldm_200", "dalle")):
        make_files(dd / name / "1_fake", 1 + i, size=size)
        expected[name] = (2 if name == "guided" else 3, 1 + i)
    return expected



def make_progan(root: Path, classes=("car", "cat"), per_label: int = 3, split: str = "train") -> Path:
    seed = 0
    for c in classes:
        for label in ("0_real", "1_fake"):
            for i in range(per_label):
                seed += 1
                # sizes vary, and some are smaller than 224 (padded by the transforms)
                write_image(root / split / c / label / f"{i}.png", size=(180 + 30 * i, 250), seed=seed)
    return root
