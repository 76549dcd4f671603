"""`rine detect`: score images for being synthetic.

Examples:
  rine detect photo.jpg                       # default model, downloaded on first use
  rine detect photos/ 'shots/**/*.png' --format csv --output scores.csv
  rine detect img.jpg --backbone ./clip-vit-large-patch14 --head ./model_4class_trainable.pth
  rine detect archive/ -o scores.jsonl --resume   # after an interruption: score only the rest

Exit status: 0 all files scored, 1 some files could not be read (they get an error
record), 2 bad usage or missing weights.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
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
    o.add_argument(
        "--resume",
        action="store_true",
        help="append to --output (jsonl or csv) and skip the inputs that already have a record "
        "there, e.g. after an interrupted run; an unfinished last record is replaced. "
        "Without it, --output is overwritten",
    )
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

    def __init__(self, stream: TextIO, fmt: str, with_blocks: bool, header: bool = True):
        self.stream, self.fmt, self.with_blocks = stream, fmt, with_blocks
        self.rows: list[dict] = []
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if header:
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


def records_done(output: Path, fmt: str) -> set[str]:
    """The paths that already have a record in `output`, the jsonl or csv file of an earlier
    run; raises CLIError if it is not such a file. A last record without its line end (the
    run was killed while writing it) is cut off, once the rest has been read."""
    if not output.exists():
        return set()
    if not output.is_file():
        raise CLIError(f"--output {output} is not a file")
    data = output.read_bytes()
    end = b"\r\n" if fmt == "csv" else b"\n"  # the csv module ends rows with \r\n
    complete = data.rfind(end) + len(end) if end in data else 0
    redo = "; or drop --resume to start over (the file is then overwritten)"
    tail = data[complete:]
    # What an interrupted write leaves: the start of a record (or of the csv header).
    record_start = b'{"path": ' if fmt == "jsonl" else b""
    header_line = (",".join(CSV_FIELDS) + "\r\n").encode()
    if fmt == "csv" and complete == 0:
        record_start = header_line
    if tail and not (record_start.startswith(tail) or tail.startswith(record_start)):
        raise CLIError(f"--resume: the last line of {output} is not a rine detect record: fix or remove it{redo}")
    try:
        text = data[:complete].decode("utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"--resume: {output} is not a text file written by rine detect{redo}") from None
    done: set[str] = set()
    if fmt == "jsonl":
        for n, line in enumerate(text.split("\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path = record["path"]
            except (ValueError, KeyError, TypeError):
                raise CLIError(f"--resume: {output}, line {n}, is not a rine detect record: fix or remove it{redo}") from None
            done.add(str(path))
    else:
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = next(rows, None)
            if header is not None and tuple(header) != CSV_FIELDS:
                raise CLIError(f"--resume: {output} has the header {header}, not rine detect's {list(CSV_FIELDS)}{redo}")
            for row in rows:
                if len(row) != len(CSV_FIELDS):
                    raise CLIError(f"--resume: {output}, line {rows.line_num}, is not a rine detect record: "
                                   f"fix or remove it{redo}")  # fmt: skip
                done.add(row[0])
        except csv.Error as e:
            raise CLIError(f"--resume: {output} cannot be read as csv ({e}){redo}") from None
    if tail:
        with output.open("r+b") as f:
            f.truncate(complete)
        print(f"rine: {output}: removed an unfinished last record (it is scored again)", file=sys.stderr)
    return done


def run(args: argparse.Namespace) -> int:
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    if args.batch_size is not None and args.batch_size < 1:
        return fail("--batch-size must be at least 1")
    paths = list(expand_inputs(args.inputs))
    if not paths:
        return fail("no input images found")
    fmt = args.format or ("table" if sys.stdout.isatty() and not args.output else "jsonl")
    header = True
    if args.resume:
        if not args.output:
            return fail("--resume needs --output FILE: the file of the run to resume")
        if fmt not in ("jsonl", "csv"):
            return fail(f"--resume needs --format jsonl or csv (written record by record), not {fmt}")
        try:
            done = records_done(Path(args.output), fmt)
        except CLIError as e:
            return fail(str(e))
        header = not Path(args.output).exists() or Path(args.output).stat().st_size == 0
        todo = [p for p in paths if p not in done]
        print(f"rine: resuming {args.output}: {len(paths) - len(todo)} of {len(paths)} inputs already have "
              f"a record; scoring {len(todo)}", file=sys.stderr)  # fmt: skip
        if not todo:
            return 0
        paths = todo
    try:
        detector = load_detector(args, keep_reference=False)  # scoring only: half the memory
    except CLIError as e:
        return fail(str(e))
    detector.max_pixels = args.max_pixels
    detector.max_bytes = args.max_bytes
    mode = "a" if args.resume else "w"
    stream = open(args.output, mode, encoding="utf-8", newline="") if args.output else sys.stdout
    writer = _Writer(stream, fmt, args.blocks, header=header)
    n_failed = n_written = 0
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
            n_written += 1
    except KeyboardInterrupt:
        if args.output and fmt in ("jsonl", "csv"):
            print(f"rine: {n_written} of {len(paths)} records written to {args.output}; run the same command "
                  "with --resume to score the rest", file=sys.stderr)  # fmt: skip
        raise
    finally:
        writer.close()
        if args.output:
            stream.close()
    if n_failed:
        print(f"rine: {n_failed} of {len(paths)} inputs could not be scored (see their error field)", file=sys.stderr)
        return 1
    return 0
