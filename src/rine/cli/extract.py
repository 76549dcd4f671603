"""`rine extract`: store the backbone taps of a dataset once, for cheap training and grids.

Examples:
  rine extract --root DATA --layout progan --split train --classes car,cat --backbone ViT-L/14 --out feats/train
  rine extract --root DATA --layout progan --split val --classes car,cat --backbone ViT-L/14 --transform center --out feats/val
  rine extract --root DATA/test/progan --layout folder --transform center --backbone ViT-L/14 --out feats/test-progan
  rine extract --layout parquet --hub nebula/OpenSDI_train --splits sd15 --transform train --backbone ViT-L/14 --out feats/opensdi-sd15

Training splits get the reference's train augmentation (one random view per image and
--views slot, seeded by --seed); --transform center stores the test transform. Rerun the
same command after an interruption (even kill -9): it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from .common import CLIError, check_device, check_output_dir, fail, positive_int
from .hubdata import PARQUET_SUITES


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.datasets import LAYOUTS

    p = sub.add_parser("extract", help="store backbone taps of a dataset (resumable)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="dataset root folder (or --hub for Parquet layouts)")
    p.add_argument("--layout", choices=LAYOUTS, default="progan", help="dataset layout (default progan)")
    p.add_argument("--split", default=None, help="train, val (progan), train/valid (ldm); default train")
    p.add_argument("--classes", default=None, help="comma-separated ProGAN classes (default: all present)")
    p.add_argument("--backbone", required=True, metavar="SRC", help="CLIP backbone: name, hub id, folder or OpenAI file")
    p.add_argument("--revision", default=None, help="hub revision of --backbone")
    p.add_argument("--out", required=True, metavar="STORE",
                   help="output store folder (created; an existing store of the same command is resumed)")
    p.add_argument("--transform", choices=("train", "center", "ten"), default=None,
                   help="train: the reference's augmentation; center: CenterCrop 224; ten: TenCrop 224, ten "
                        "views per image scored as their mean logit (the reference's Synthbuster / "
                        "latent-diffusion protocol). Default: train for the train split of progan or ldm, "
                        "center otherwise")
    p.add_argument("--views", type=positive_int, default=1, help="augmented views per image (one per epoch; default 1)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed (default 0)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision (default float16)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="views per encoder batch (default 32)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard (default 1024)")
    p.add_argument("--workers", type=positive_int, default=None, help="decoding threads (default: cores, up to 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="encoder precision (default fp32)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N images, for smoke runs (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .hubdata import add_hub_options

    add_hub_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.augment import views_for
    from ..data.datasets import layout_items
    from ..data.decoding import DecodeOptions
    from ..data.tap_store import StoreError
    from ..model.backbones import load_backbone
    from ..training.features import extract_features

    # Before any work: a bad --out or --device must not cost a dataset scan or a backbone load.
    # An existing folder is fine (a store there is resumed).
    try:
        args.out = str(check_output_dir(args.out))
        check_device(args.device)
    except CLIError as e:
        return fail(str(e))
    if args.views < 1 or args.batch_size < 1 or args.shard_size < 1:
        return fail("--views, --batch-size and --shard-size must be at least 1")
    split = args.split or "train"
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    sources = None
    try:
        if args.layout in PARQUET_SUITES or args.hub:
            items, sources = _parquet_items(args, classes)
        else:
            if not args.root:
                raise CLIError("--root is required (the dataset folder)")
            items = layout_items(args.root, args.layout, split, classes)
    except CLIError as e:
        return fail(str(e))
    except OSError as e:  # a folder that cannot be listed: no silent gaps in the training set
        return fail(f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e))
    except ValueError as e:
        return fail(str(e))
    if args.limit is not None:
        items = items[: args.limit]
        sources = None if sources is None else sources.subset(args.limit)
    if not items:
        return fail("no images found")
    # The train augmentation is for training splits of training layouts; test layouts are
    # extracted with the test transform unless asked otherwise.
    is_training_data = args.layout in ("progan", "ldm") and split == "train"  # Parquet: say --transform train
    transform = args.transform or ("train" if is_training_data else "center")
    if transform != "train" and args.views != 1:
        return fail("--views > 1 only makes sense with the train transform (ten always stores its ten crops)")
    try:
        backbone = load_backbone(args.backbone, args.revision)
    except (FileNotFoundError, OSError, ValueError) as e:
        return fail(f"cannot load backbone {args.backbone!r}: {e}")
    from pathlib import Path

    if Path(args.backbone).expanduser().exists():
        # a local backbone is recorded absolute, so checkpoints trained on it load from anywhere
        backbone.source = str(Path(args.backbone).expanduser().resolve())
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    from ..inference.detector import resolve_device

    backbone = backbone.to(resolve_device(args.device), dtype=dtype)
    make_views, views = views_for(transform, args.seed, backbone.image_size, args.views)
    try:
        store = extract_features(
            backbone, items, args.out, make_views, views=views, seed=args.seed, dtype=args.dtype,
            batch_size=args.batch_size, shard_size=args.shard_size,
            decode=DecodeOptions(workers=args.workers),
            progress=not args.no_progress and sys.stderr.isatty(),
            extra_meta={"layout": args.layout, "split": split, "classes": classes, "root": str(args.root),
                        "precision": args.precision,
                        # only for Hub data: a store of folders keeps the meta.json it always had
                        **({"hub": args.hub, "hub_revision": args.hub_revision} if args.hub else {})},
            sources=None if sources is None else sources.iter_images,
        )
    except StoreError as e:
        return fail(str(e))
    print(f"{args.out}: {len(store)} rows ({store.meta['n_items']} images x {store.n_views} views, "
          f"{len(store.errors)} skipped)", file=sys.stderr)
    return 1 if store.errors else 0


def _parquet_items(args, classes):
    """(items, one ParquetSource over all of them) of a Parquet dataset (--root or --hub)."""
    from ..data.datasets import Item
    from ..data.parquet import merge_sources
    from .hubdata import read_sets

    if classes:
        raise CLIError("--classes applies to the progan layout; pick Parquet splits with --splits")
    if args.layout not in PARQUET_SUITES:
        raise CLIError(f"--hub reads Parquet datasets: use --layout {' or '.join(PARQUET_SUITES)}")
    layout = read_sets(args, args.layout, {})
    items = [Item(path, int(y), ts.name) for ts in layout.sets for path, y in ts.items]
    return items, merge_sources([ts.source for ts in layout.sets])
