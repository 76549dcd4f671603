"""The options that read Parquet datasets and Hub dataset ids, shared by `rine eval` and
`rine extract` (and any command that lists test sets): `add_hub_options` adds them,
`read_sets` turns them (and --root / --sets) into a `LayoutResult`."""

from __future__ import annotations

import argparse

from .common import CLIError

PARQUET_SUITES = ("parquet", "opensdi", "commfor")


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "Parquet datasets and the Hub",
        "For --suite parquet/opensdi/commfor: a local folder as snapshot_download leaves it (--root) or a Hub "
        "dataset id (--hub), only the splits asked for downloaded (HF_HUB_OFFLINE honoured).",
    )
    g.add_argument("--hub", metavar="OWNER/NAME", help="Hub dataset id, e.g. nebula/OpenSDI_test (instead of --root)")
    g.add_argument("--hub-revision", metavar="REV", help="revision of --hub (commit, tag or branch; default main)")
    g.add_argument("--splits", metavar="A,B", help="only these splits (default: all; --sets picks splits when "
                   "there is no --set-column)")
    g.add_argument("--image-column", metavar="COL", help="image column: a datasets Image struct {bytes, path} or "
                   "bytes (default: image, image_data, img, ...)")
    g.add_argument("--label-column", metavar="COL", default="label", help="label column (default label)")
    g.add_argument("--label-map", metavar="V=0,W=1", help="map label values to 0 real / 1 fake "
                   "(default: 0/1, real/fake)")
    g.add_argument("--set-column", metavar="COL", help="one test set per value of this column (commfor: model_name)")
    g.add_argument("--key-column", metavar="COL", help="the dataset's own row id, copied into predictions as "
                   "row_key (default: key or id when present)")


def _csv(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def read_sets(args: argparse.Namespace, suite: str, options: dict):
    """-> LayoutResult for --suite `suite` from --root or --hub; raises LayoutError / CLIError."""
    from pathlib import Path

    from ..data.layouts import read_layout

    hub = getattr(args, "hub", None)
    if suite not in PARQUET_SUITES:
        if hub:
            raise CLIError(f"--hub reads Parquet datasets (--suite {'/'.join(PARQUET_SUITES)}), not --suite {suite}")
        if not args.root:
            raise CLIError("--root is required (the data folder)")
        return read_layout(suite, args.root, **options)
    if bool(hub) == bool(args.root):
        raise CLIError("give --root DIR (a local dataset folder) or --hub OWNER/NAME, one of them")
    from ..data.parquet import ParquetColumns, parse_label_map

    options["columns"] = ParquetColumns(image=args.image_column, label=args.label_column, set=args.set_column,
                                        key=args.key_column, label_map=parse_label_map(args.label_map))
    splits = _csv(args.splits)
    if splits:
        options["splits"] = splits
    if not hub:
        return read_layout(suite, args.root, **options)
    from ..data.hub import download_dataset
    from ..data.layouts import OPENSDI_SPLITS

    wanted = splits
    if wanted is None and args.set_column is None and suite != "commfor":
        wanted = options.get("sets") or (list(OPENSDI_SPLITS) if suite == "opensdi" else None)
    root = download_dataset(hub, getattr(args, "hub_revision", None), wanted)
    options["name"] = hub
    args.root = str(root)
    return read_layout(suite, Path(root), **options)
