"""`rine detect`: score images for being synthetic.

Examples:
  rine detect photo.jpg                       # default model, downloaded on first use
  rine detect photos/ 'shots/**/*.png' --format csv --output scores.csv
  rine detect img.jpg --backbone ./clip-vit-large-patch14 --head ./model_4class_trainable.pth

Exit status: 0 all files scored, 1 some files could not be read (they get an error
record), 2 bad usage or missing weights.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import TextIO

from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .common import (
    CLIError,
    add_decoding_options,
    add_model_options,
    byte_size,
    expand_inputs,
    fail,
    load_detector,
)

FORMATS = ("table", "json", "jsonl", "csv")
CSV_FIELDS = ("path", "prob_fake", "logit", "is_fake", "error")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="score images: probability that each was made by a generative model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    add_model_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default=None, help="default: table on a terminal, jsonl otherwise")
    o.add_argument("--output", "-o", metavar="FILE", help="write results here instead of standard output")
    o.add_argument("--blocks", action="store_true", help="include each image's per-block contribution (json/jsonl)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=None, help="images per encoder batch (default 16 on CPU, 64 on GPU)")
    add_decoding_options(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this (default {DEFAULT_MAX_PIXELS:,}; protects memory)",
    )
    r.add_argument(
        "--max-bytes",
        type=byte_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help=f"refuse files larger than this, e.g. 200M or 1G (default {DEFAULT_MAX_BYTES // 2**20}M)",
    )
    p.set_defaults(func=run)


class _Writer:
    """Writes records as they arrive for streaming formats (nothing lost on interrupt)."""

    def __init__(self, stream: TextIO, fmt: str, with_blocks: bool):
        self.stream, self.fmt, self.with_blocks = stream, fmt, with_blocks
        self.rows: list[dict] = []
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
            self.csv.writeheader()

    def add(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.fmt == "csv":
            self.csv.writerow(record)
            self.stream.flush()
        else:
            self.rows.append(record)

    def close(self) -> None:
        if self.fmt == "json":
            json.dump(self.rows, self.stream, indent=2)
            self.stream.write("\n")
        elif self.fmt == "table":
            self.stream.write(_table(self.rows))
        self.stream.flush()


def _table(rows: list[dict]) -> str:
    out = io.StringIO()
    width = max([len("path")] + [len(r["path"]) for r in rows])
    width = min(width, 80)
    out.write(f"{'path':<{width}}  {'prob_fake':>9}  verdict\n")
    for r in rows:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3) :]
        if r["error"]:
            out.write(f"{path:<{width}}  {'-':>9}  error: {r['error']}\n")
        else:
            verdict = "synthetic" if r["is_fake"] else "real"
            out.write(f"{path:<{width}}  {r['prob_fake']:>9.4f}  {verdict}\n")
    return out.getvalue()


def run(args: argparse.Namespace) -> int:
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    if args.batch_size is not None and args.batch_size < 1:
        return fail("--batch-size must be at least 1")
    paths = list(expand_inputs(args.inputs))
    if not paths:
        return fail("no input images found")
    try:
        detector = load_detector(args, keep_reference=False)  # scoring only: half the memory
    except CLIError as e:
        return fail(str(e))
    detector.max_pixels = args.max_pixels
    detector.max_bytes = args.max_bytes
    fmt = args.format or ("table" if sys.stdout.isatty() and not args.output else "jsonl")
    stream = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    writer = _Writer(stream, fmt, args.blocks)
    n_failed = 0
    try:
        for pred in detector.predict_iter(
            paths,
            batch_size=args.batch_size,
            num_workers=args.workers,
            decoder=args.decoder,
            decode_timeout=args.decode_timeout or None,
            progress=not args.no_progress and sys.stderr.isatty(),
            total=len(paths),
        ):
            n_failed += pred.error is not None
            writer.add(pred.to_dict(with_blocks=args.blocks))
    finally:
        writer.close()
        if args.output:
            stream.close()
    if n_failed:
        print(f"rine: {n_failed} of {len(paths)} inputs could not be scored (see their error field)", file=sys.stderr)
        return 1
    return 0
