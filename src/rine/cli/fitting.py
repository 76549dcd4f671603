"""Options and data readers shared by `rine calibrate` and `rine eval --calibrate-on`:
which fit to run (--method, --target-fpr, --objective, ...) and images given as a folder or
a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError

METHODS = ("temperature", "platt", "prior-shift")


def _unit(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_fit_options(group: argparse._ArgumentGroup, band: bool = True) -> None:
    """The choice of fit, shared with `rine eval --calibrate-on`."""
    from ..config import CALIBRATION_OBJECTIVES as OBJECTIVES

    group.add_argument("--method", choices=METHODS, default=None,
                       help="a calibrated probability: temperature or platt (labelled real and fake images), "
                            "prior-shift (unlabelled images of the target domain). Default: keep the "
                            "probability, only move the cut (--target-fpr or --objective)")
    group.add_argument("--target-fpr", type=_unit, default=None, metavar="F",
                       help="the cut that flags at most a fraction F of real images, with --confidence "
                            "(reals only are enough; 0.05 needs >= 59 real images, 0.01 needs >= 299)")
    group.add_argument("--objective", choices=OBJECTIVES, default=None,
                       help="the cut maximising balanced accuracy, F1 of the fake class or accuracy "
                            "(labelled real and fake images)")
    group.add_argument("--fake-share", type=_unit, default=None, metavar="P",
                       help="prior-shift: the expected share of fakes among the images (default 0.5)")
    group.add_argument("--confidence", type=_unit, default=0.95,
                       help="confidence of the --target-fpr guarantee (default %(default)s)")
    if band:
        group.add_argument("--uncertain-band", default=None, metavar="W|auto",
                           help="give the verdict `uncertain` to probabilities within W of the cut (e.g. 0.1), "
                                "or `auto`: where the cut moves under the bootstrap (95 %%). Default: none "
                                "(the paper's protocol)")


def fit_options_from_args(args: argparse.Namespace) -> dict:
    """{"fit": keyword arguments of fit_calibration, "labelled": whether labels are used};
    CLIError for a combination that cannot work, before anything is scored."""
    from ..evaluation.calibration import CalibrationError, check_fpr

    if args.method is None and args.target_fpr is None and args.objective is None:
        raise CLIError("choose a fit: --target-fpr F, --objective balanced|f1|accuracy or --method "
                       "temperature|platt|prior-shift (docs/calibration.md)")
    if args.target_fpr is not None and args.objective is not None:
        raise CLIError("give either --target-fpr or --objective, not both")
    try:
        if args.target_fpr is not None:
            check_fpr(args.target_fpr, args.confidence)
        elif not 0.0 < args.confidence < 1.0:
            raise CalibrationError(f"--confidence must be between 0 and 1 (exclusive), got {args.confidence}")
    except CalibrationError as e:
        raise CLIError(f"--target-fpr/--confidence: {e}") from None
    if args.fake_share is not None:
        if args.method != "prior-shift":
            raise CLIError("--fake-share goes with --method prior-shift")
        if not 0.0 < args.fake_share < 1.0:
            raise CLIError(f"--fake-share must be between 0 and 1 (exclusive), got {args.fake_share}")
    if args.method == "prior-shift" and (args.objective is not None or args.target_fpr is not None):
        raise CLIError("--method prior-shift uses no labels, so it cuts at its own balance point: --objective needs "
                       "labels and --target-fpr known real images (give those with --reals, without prior-shift)")
    fit = {"method": args.method or "threshold", "target_fpr": args.target_fpr, "objective": args.objective,
           "fake_share": args.fake_share, "confidence": args.confidence}
    return {"fit": fit, "labelled": args.method != "prior-shift"}


# ---------------------------------------------------------------------------- data
def _has_class_folders(folder: Path, names: frozenset[str] | None = None, depth: int = 6) -> bool:
    """Whether a folder named in `names` (default: real and fake names) lies under `folder`."""
    from ..data.layouts import FAKE_NAMES, REAL_NAMES

    names = REAL_NAMES | FAKE_NAMES if names is None else names
    if depth < 0:
        return False
    try:
        subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return False
    return any(d.name.lower() in names or _has_class_folders(d, names, depth - 1) for d in subdirs)


def read_images_arg(source: str, option: str, reals_only: bool = False):
    """A TestSet from a folder or a manifest. A folder with real/fake class folders is read as
    the `folder` layout (labels from the folder names); any other folder's images are all
    real (label 0). `reals_only` refuses fakes (--reals)."""
    from ..data.layouts import list_images, read_folder, read_manifest
    from ..data.scan import Skipped
    from ..data.testsets import LayoutError, TestSet

    path = Path(source).expanduser()
    items: list[tuple[str, int]] = []
    skipped = Skipped()
    if path.is_file():
        sets = read_manifest(path).sets
        items = [it for s in sets for it in s.items]
        name = path.stem
    elif path.is_dir():
        name = path.resolve().name
        from ..data.layouts import FAKE_NAMES

        if reals_only and _has_class_folders(path, FAKE_NAMES):
            raise LayoutError(f"{option} {source}: it holds real/fake class folders; use --suite folder --root "
                              f"{source} for labelled images")
        if not reals_only and _has_class_folders(path):
            for s in read_folder(path).sets:
                items += s.items
                skipped.update(s.skipped)
        else:
            try:
                items = [(p, 0) for p in list_images(path, skipped)]
            except OSError as e:
                raise LayoutError(f"{option} {source}: cannot read {e.filename}: {e.strerror}") from None
    else:
        raise LayoutError(f"{option} {source}: no such folder or file")
    if not items:
        raise LayoutError(f"{option} {source}: no images found")
    n_fake = sum(1 for _, y in items if y == 1)
    if reals_only and n_fake:
        raise LayoutError(f"{option} {source}: the manifest lists {n_fake} fake images; --reals takes authentic "
                          "images only (use --suite manifest --root FILE for labelled ones)")
    return TestSet(name, items, skipped=skipped)
