"""Show what image files declare about their origin, and what of it is verified; no model.

Reads C2PA Content Credentials (verified against the trust anchors you give), the IPTC
DigitalSourceType in XMP, generator parameters in PNG text chunks and EXIF (AUTOMATIC1111,
ComfyUI, InvokeAI, NovelAI, Fooocus, ...) and the Stable Diffusion / SDXL invisible watermark
(lossless files only). No model is loaded and no weights are needed.

A declaration is only `verified` when a C2PA manifest is intact (signature and the hash over
exactly these bytes) and its signer chains to a certificate in --trust-anchors: everything else
is what the file says about itself, which anyone can write. No metadata proves nothing: most
platforms strip it. See docs/provenance.md.

examples:
  rine provenance image.png downloads/
  rine provenance --trust-anchors c2pa-trust-anchors.pem --format jsonl photos/ -o evidence.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from typing import TextIO

from ..data.images import DEFAULT_MAX_BYTES
from ..data.scan import Skipped, expand_inputs
from ..provenance.types import FLAT_FIELDS, TRUST_ENV, TrustConfig
from .common import byte_size, check_output_file, fail, plural, report_skipped, shown

FORMATS = ("table", "json", "jsonl", "csv")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provenance", help="what image files declare about their origin (C2PA, XMP, "
                       "generator metadata, watermarks); no model needed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="image files, folders (recursive, as `rine detect`) or globs")
    add_trust_option(p)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from the --output file's name (.csv, .json; else jsonl), or a table on a terminal, jsonl otherwise")
    p.add_argument("--output", "-o", metavar="FILE", help="write the records here instead of standard output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal when writing to --output)")
    p.add_argument("--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help=f"skip files larger than this (default {DEFAULT_MAX_BYTES // 2**20}M)")
    p.set_defaults(func=run)


def add_trust_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--trust-anchors", metavar="PEM", default=None,
                   help=f"PEM file of root certificates whose C2PA signatures you trust (default: ${TRUST_ENV}; "
                   "without anchors no manifest is `verified`). The C2PA and CAI trust lists: docs/provenance.md")


def resolve_trust(args: argparse.Namespace) -> TrustConfig:
    """Raises ValueError with a message naming the file."""
    return TrustConfig.resolve(args.trust_anchors)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if args.output:
        return "csv" if args.output.endswith(".csv") else "json" if args.output.endswith(".json") else "jsonl"
    return "table" if sys.stdout.isatty() else "jsonl"


def run(args: argparse.Namespace) -> int:
    from ..data.images import ImageLoadError, read_source
    from ..provenance.reader import read_provenance  # numpy: imported when run, not for --help

    try:
        trust = resolve_trust(args)
    except ValueError as e:
        return fail(f"{e} (--trust-anchors or ${TRUST_ENV})")
    fmt = _format(args)
    if args.output:
        check_output_file(args.output)
    unreadable: list[tuple[str, str]] = []
    skipped = Skipped()
    paths = list(dict.fromkeys(expand_inputs(args.inputs, unreadable, skipped)))
    report_skipped(skipped, logging.getLogger(__name__))
    records = [{"path": p, "provenance": None, "error": why} for p, why in unreadable]
    stream = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = _Writer(stream, fmt)
        for record in records:
            writer.add(record)
        bar = None
        if args.output and not args.no_progress and sys.stderr.isatty() and len(paths) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="file", desc="provenance", file=sys.stderr)
        for path in paths:
            if bar is not None:
                bar.update()
            try:
                data = read_source(path, args.max_bytes)
            except ImageLoadError as e:
                record = {"path": path, "provenance": None, "error": str(e)}
            else:
                record = {"path": path, "provenance": read_provenance(data, filename=path, trust=trust), "error": None}
            records.append(record)
            writer.add(record)
        writer.close()
        if bar is not None:
            bar.close()
    finally:
        if args.output:
            stream.close()
    errors = sum(1 for r in records if r["error"])
    if errors:
        print(f"rine: {plural(errors, 'file')} could not be read", file=sys.stderr)
    return 1 if errors else 0


class _Writer:
    def __init__(self, stream: TextIO, fmt: str):
        self.stream, self.fmt, self.rows = stream, fmt, []
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=("path", *FLAT_FIELDS, "error"))
            self.csv.writeheader()

    def add(self, record: dict) -> None:
        p = record["provenance"]
        if self.fmt == "jsonl":
            self.stream.write(json.dumps({**record, "provenance": p and p.to_dict()}) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow({"path": record["path"], **(p.flat() if p else {}), "error": record["error"] or ""})
        elif self.fmt == "json":
            self.rows.append({**record, "provenance": p and p.to_dict()})
        else:
            self.stream.write(_table_row(record))
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            json.dump(self.rows, self.stream, indent=2)
            self.stream.write("\n")


def _table_row(record: dict) -> str:
    """A few lines per file, in words: what it declares, whether verified, the evidence."""
    p = record["provenance"]
    head = shown(record["path"])
    if p is None:
        return f"{head}\n  error: {record['error']}\n"
    declared = p.digital_source_type or "nothing"
    lines = [f"{head}", f"  declares: {declared}" + (" (verified)" if p.verified else ""), f"  {p.reason}"]
    for s in p.signals:
        what = s.error and f"error: {s.error}" or " ".join(x for x in (s.source_type, s.generator and f"[{s.generator}]",
                                                                       s.value and repr(s.value[:100])) if x)
        lines.append(f"    {s.kind:<9} {s.where}: {what}")
    lines += [f"  missing reader: {m}" for m in p.missing]
    return "\n".join(lines) + "\n"
