"""`rine train`: train a RINE head on stored taps (or on images, like the reference's loop).

Examples:
  rine train --features feats/train --val-features feats/val --out ckpt/my-rine
  rine train --features feats/train --out ckpt/b --nproj 2 --proj-dim 1024 --factor 0.2 --epochs 1
  rine train --root DATA --layout progan --classes car,cat --backbone ViT-L/14 --out ckpt/e2e

Writes OUT/model.safetensors + config.json (load with `rine detect --model OUT`),
OUT/train_log.jsonl (one line per epoch), OUT/train_config.json and OUT/importance.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from .common import CLIError, check_device, check_output_dir, fail, positive_int


def number_list(
    cast: type, option: str, example: str, minimum: float | None = None, allow_empty: bool = False
) -> Callable[[str], tuple]:
    """argparse type for a comma-separated list of numbers (`cast`: int or float), as a tuple.
    A bad item is named with an example of the option, e.g. "'x' is not a number
    (example: --factors 0.1,0.2)"."""
    noun = "whole number" if cast is int else "number"
    hint = f"(example: {option} {example})"

    def parse(text: str) -> tuple:
        values = []
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            try:
                value = cast(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not a {noun} {hint}") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{item!r} is not a finite number {hint}")
            if minimum is not None and value < minimum:
                raise argparse.ArgumentTypeError(f"{item!r}: each value must be at least {minimum} {hint}")
            values.append(value)
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one value {hint}")
        return tuple(values)

    parse.__name__ = f"{option.lstrip('-')} list"
    return parse


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Hyper-parameters shared by `rine train` and `rine grid` (defaults: the paper's)."""
    h = p.add_argument_group("training (defaults: the paper's)")
    h.add_argument("--epochs", type=positive_int, default=1, help="epochs (default 1)")
    h.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    h.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    h.add_argument("--lr-milestones", default="6,11", metavar="E,E",
                   type=number_list(int, "--lr-milestones", "6,11", minimum=1, allow_empty=True),
                   help="1-based epochs where lr is divided by 10 (default 6,11; '' for none)")
    h.add_argument("--seed", type=int, default=0, help="seed of head init, dropout and batch order (default 0)")
    h.add_argument("--fraction", type=float, default=1.0, help="share of the training images used (default 1)")
    a = p.add_argument_group("ablations")
    a.add_argument("--no-contrastive", action="store_true", help="BCE only (no SupCon term)")
    a.add_argument("--no-tie", action="store_true", help="uniform mean over blocks instead of TIE")
    a.add_argument("--last-block", action="store_true", help="only the last block's token (no intermediate blocks)")


def train_config_from_args(args: argparse.Namespace, **overrides):
    from ..training.trainer import TrainConfig

    milestones = args.lr_milestones
    if isinstance(milestones, str):  # a Namespace built by hand, not by the parser
        try:
            milestones = number_list(int, "--lr-milestones", "6,11", minimum=1, allow_empty=True)(milestones)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--lr-milestones: {e}") from None
    kw = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, lr_milestones=milestones,
              seed=args.seed, fraction=args.fraction, contrastive=not args.no_contrastive,
              use_tie=not args.no_tie, blocks="last" if args.last_block else "all")
    kw.update(overrides)
    return TrainConfig(**kw)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a RINE head (from a feature store or from images)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("data")
    s.add_argument("--features", metavar="STORE", help="training store made by `rine extract`")
    s.add_argument("--val-features", metavar="STORE", help="validation store (center transform); best epoch kept")
    s.add_argument("--root", help="train straight from images under ROOT instead of --features")
    s.add_argument("--layout", default="progan", help="layout of --root (progan, ldm, folder; default progan)")
    s.add_argument("--classes", help="comma-separated ProGAN classes of --root (default: all present)")
    s.add_argument("--backbone", metavar="SRC", help="backbone for --root")
    s.add_argument("--revision", help="hub revision of --backbone")
    p.add_argument("--out", required=True, metavar="CKPT_DIR",
                   help="output checkpoint folder (created; must not be a file)")
    p.add_argument("--name", default=None, help="model name recorded in config.json (default: none)")
    m = p.add_argument_group("model")
    m.add_argument("--nproj", type=positive_int, default=4, help="projection layers (default 4)")
    m.add_argument("--proj-dim", type=positive_int, default=128, help="projection width (default 128)")
    m.add_argument("--factor", type=float, default=0.2, help="weight of the contrastive loss (default 0.2)")
    add_train_options(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu: byte-reproducible)")
    p.add_argument("--no-plot", action="store_true", help="skip importance.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.tap_store import FeatureStore, StoreError
    from ..training.trainer import ImageTaps, StoreTaps, save_run, train_head

    if bool(args.features) == bool(args.root):
        return fail("give exactly one of --features STORE or --root DATA")
    if args.root and not args.backbone:
        return fail("--root needs --backbone")
    # Before any loading: a bad --out or --device must not cost a store read or a backbone load.
    try:
        args.out = str(check_output_dir(args.out))
        check_device(args.device)
    except CLIError as e:
        return fail(str(e))
    from ..inference.detector import resolve_device

    device = resolve_device(args.device)
    try:
        cfg = train_config_from_args(args, nproj=args.nproj, proj_dim=args.proj_dim, factor=args.factor)
    except ValueError as e:
        return fail(str(e))
    try:
        val = FeatureStore.open(args.val_features) if args.val_features else None
        if args.features:
            store = FeatureStore.open(args.features)
            if not store.complete:
                return fail(f"{args.features} is incomplete: rerun its `rine extract` command to finish it")
            if store.n_views < cfg.epochs:
                print(f"rine: note: {store.n_views} stored views for {cfg.epochs} epochs: views are reused "
                      "(epoch e uses view e mod K)", file=sys.stderr)
            source = StoreTaps(store)
            backbone, revision = store.meta["backbone"], store.meta["revision"]
            meta = {"features": str(Path(args.features).resolve()), "store_transform": store.meta["transform"],
                    "store_seed": store.meta["seed"], "store_items_sha1": store.meta["items_sha1"]}
        else:
            from ..data.augment import TrainAugment
            from ..data.datasets import layout_items
            from ..model.backbones import load_backbone

            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            items = layout_items(args.root, args.layout, "train", classes)
            bb = load_backbone(args.backbone, args.revision)
            if Path(args.backbone).expanduser().exists():
                bb.source = str(Path(args.backbone).expanduser().resolve())
            source = ImageTaps(bb.to(device), items, TrainAugment(cfg.seed))
            backbone, revision = bb.source, bb.revision
            meta = {"root": str(args.root), "layout": args.layout, "classes": classes}
        if val is not None and (val.meta["backbone"], val.meta["revision"]) != (backbone, revision):
            return fail(f"--val-features was made with backbone {val.meta['backbone']!r}, "
                        f"the training data with {backbone!r}")
    except (StoreError, FileNotFoundError, ValueError, OSError) as e:
        return fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = train_head(source, cfg, val=val, log_path=out / "train_log.jsonl",
                        progress=not args.no_progress and sys.stderr.isatty(), device=device)
    save_run(result, cfg, out, backbone, revision, name=args.name, meta=meta, plot=not args.no_plot)
    last = result.history[-1]
    summary = ", ".join(f"{k}={last[k]:.4f}" for k in ("loss", "val_acc", "val_ap") if k in last)
    print(f"{out}: best epoch {result.best_epoch} ({summary})", file=sys.stderr)
    return 0
