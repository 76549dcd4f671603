"""`rine detect`: score images for being synthetic.

Examples:
  rine detect photo.jpg                       # default model, downloaded on first use
  rine detect photos/ 'shots/**/*.png' --output scores.csv   # format from the file name
  rine detect img.jpg --backbone ./clip-vit-large-patch14 --head ./model_4class_trainable.pth
  rine detect archive/ -o scores.jsonl --resume   # after an interruption: score only the rest
  rine detect photos/ --model my-rine/            # a model calibrated by rine calibrate: its threshold
  rine detect --stability photo.jpg               # "uncertain" when an everyday re-save flips the verdict

Exit status: 0 all files scored, 1 some files could not be read (they get an error
record; with --resume, also those of the earlier run), 2 bad usage or missing weights.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import TextIO

from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..data.scan import Skipped, expand_inputs
from .common import (
    CLIError,
    add_decision_options,
    add_decoding_options,
    add_model_options,
    apply_decision_options,
    byte_size,
    check_device,
    check_output_file,
    decode_options,
    fail,
    load_detector,
    pixel_count,
    plural,
    positive_int,
    report_skipped,
    resolve_backend,
    shown,
    sigterm_as_interrupt,
)
from .provenance import add_trust_option, resolve_trust
from .resume import (
    check_columns,
    csv_fields,
    drop_unfinished,
    first_seen,
    place_of,
    plan_resume,
    resumed_fields,
    sniff_format,
)

logger = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl", "csv")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="score images: probability that each was made by a generative model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files (JPEG, PNG, WebP, AVIF, BMP, TIFF, GIF, PPM/PGM; "
                   "judged by content), folders (recursive: files with an image extension, hidden ones "
                   "left out; the summary counts what was skipped, -v lists it) or globs. A file given "
                   "twice (or inside a folder also given) is scored once")
    add_model_options(p)
    d = p.add_argument_group("decision")
    add_decision_options(d)
    d.add_argument("--stability", action="store_true",
                   help="also score each image re-encoded as jpeg90, jpeg70, fit1080 and webp80 (docs/stability.md), "
                        "decoded once and batched with it (about 5x the encoder's work): records gain `stability` "
                        "(each one's probability, spread, flips, reason) and always a threshold and a verdict, "
                        "`uncertain` when a re-encoding gives the other call")
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default=None, help="default: from the --output file's name (.csv, .json; else jsonl), "
                   "or a table on a terminal, jsonl otherwise")
    o.add_argument("--output", "-o", metavar="FILE", help="write results here instead of standard output")
    o.add_argument("--blocks", action="store_true", help="include each image's per-block contribution (json/jsonl)")
    o.add_argument("--no-provenance", action="store_true", help="leave out what each file declares about its origin "
                   "(the `provenance` record, CSV's provenance_* columns and the combined `decision`; docs/provenance.md)")
    add_trust_option(o)
    o.add_argument(
        "--resume",
        action="store_true",
        help="append to --output (jsonl or csv) and skip the inputs that already have a record "
        "there (relative and absolute spellings of a path are one input; a symlink is its own), "
        "e.g. after an interrupted run; an unfinished last record is replaced. Error "
        "records count as done (and in the exit status): remove their lines to retry them. "
        "A csv of other columns (threshold and verdict come with a calibrated model, --threshold, "
        "--uncertain-band or --stability, the stability columns with --stability) is refused. "
        "Without --resume, --output is overwritten",
    )
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=positive_int, default=None, help="images per encoder batch (default 16 on CPU, 64 on GPU)")
    add_decoding_options(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--max-pixels",
        type=pixel_count,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this, e.g. 100M (default {DEFAULT_MAX_PIXELS // 10**6}M; "
        "protects memory)",
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

    def __init__(self, stream: TextIO, fmt: str, with_blocks: bool, header: bool = True,
                 fields: tuple[str, ...] = csv_fields(False, False, False)):
        self.stream, self.fmt, self.with_blocks = stream, fmt, with_blocks
        self.rows: list[dict] = []
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
            if header:
                self.csv.writeheader()

    def add(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.fmt == "csv":
            self.csv.writerow(_flat(record))
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


def _flat(record: dict) -> dict:
    """A record's `stability` as the csv's stability_* columns."""
    st = record.get("stability")
    if not st:
        return record
    flat = {**record, "stability_spread": st["spread"], "stability_flips": st["flips"], "stability_reason": st["reason"]}
    flat.update({f"stability_{c}": p for c, p in st["conditions"].items()})
    return flat


def _table(rows: list[dict]) -> str:
    rows = [{**r, "path": shown(r["path"])} for r in rows]
    out = io.StringIO()
    width = max([len("path")] + [len(r["path"]) for r in rows])
    width = min(width, 80)
    out.write(f"{'path':<{width}}  {'prob_fake':>9}  verdict\n")
    for r in rows:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3) :]
        if r["error"]:
            out.write(f"{path:<{width}}  {'-':>9}  error: {r['error']}\n")
        else:
            verdict = r.get("verdict") or ("synthetic" if r["is_fake"] else "real")
            if r.get("stability") and r["stability"]["flips"]:
                verdict += f": {r['stability']['reason']}"
            out.write(f"{path:<{width}}  {r['prob_fake']:>9.4f}  {verdict}{_declared(r)}\n")
    return out.getvalue()


def _declared(r: dict) -> str:
    """What the file declares, beside the verdict (only when it declares something)."""
    p, d = r.get("provenance"), r.get("decision") or {}
    if not p or not p.get("digital_source_type"):
        return ""
    how = "verified" if p["verified"] else "unverified"
    decided = f"; decision: {d['decision']}" if p["verified"] and d.get("decision") else ""
    return f"  (declares {p['digital_source_type']}, {how}{decided})"


def format_for(output: str | None) -> str:
    """The format when --format is not given: from the --output file's name, else a table
    on a terminal and jsonl otherwise."""
    if output:
        return {".csv": "csv", ".json": "json", ".txt": "table"}.get(Path(output).suffix.lower(), "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


def _limit_hint(n_pixels: int, n_bytes: int) -> str:
    hints = [f"{n} over --{opt} (raise it to score them)" for n, opt in ((n_pixels, "max-pixels"), (n_bytes, "max-bytes")) if n]
    return "; " + ", ".join(hints) if hints else ""


def _report_scan(skipped: Skipped, n_duplicates: int) -> None:
    """What the expansion of the inputs left out, on stderr; -v lists the skipped files."""
    report_skipped(skipped, logger)
    if n_duplicates:
        print(f"rine: {plural(n_duplicates, 'duplicate input')} dropped (the same file given twice, or inside a "
              "folder also given): each file is scored once", file=sys.stderr)


def _with_provenance(record: dict, provenance, fmt: str) -> dict:
    """The detector's record plus the provenance (JSON) or its flat columns (CSV) and the
    combined decision; the detector's own fields stay as they are."""
    from ..provenance.records import flat_columns, with_provenance

    return {**record, **flat_columns(record, provenance)} if fmt == "csv" else with_provenance(record, provenance)


def run(args: argparse.Namespace) -> int:
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    try:
        trust = None if args.no_provenance else resolve_trust(args)
    except ValueError as e:
        return fail(f"{e} (--trust-anchors or $RINE_TRUST_ANCHORS)")
    try:
        output = check_output_file(args.output, "--output") if args.output else None
        if resolve_backend(args) == "torch":  # ONNX Runtime checks its own providers
            check_device(args.device)
    except CLIError as e:
        return fail(str(e))
    unreadable: list[tuple[str, str]] = []
    skipped = Skipped()
    paths, n_duplicates = first_seen(expand_inputs(args.inputs, unreadable, skipped))
    firsts: dict[str, tuple[str, str]] = {}
    for path, why in unreadable:  # a folder given twice, unlistable: one record
        firsts.setdefault(place_of(path), (path, why))
    unreadable = list(firsts.values())
    _report_scan(skipped, n_duplicates)
    if not paths and not unreadable:
        return fail("no input images found" + (f" ({skipped.summary()})" if skipped.total else ""))
    # Resuming: the file's own format first, so that runs started before the format followed
    # the file name (jsonl in a .json or .csv file) go on as they began.
    fmt = args.format or (args.resume and output and sniff_format(output)) or format_for(args.output)
    header, failed_before, plan = True, 0, None
    if args.resume:
        if output is None:
            return fail("--resume needs --output FILE: the file of the run to resume")
        if fmt not in ("jsonl", "csv"):
            return fail(f"--resume needs --format jsonl or csv (written record by record), not {fmt}")
        try:
            plan = plan_resume(output, fmt, paths, unreadable)
        except CLIError as e:
            return fail(str(e))
        if not plan.todo and not plan.unreadable:
            drop_unfinished(output, plan.earlier)
            return 1 if plan.failed_before else 0
        paths, unreadable, header, failed_before = plan.todo, plan.unreadable, plan.header, plan.failed_before
    try:
        detector = load_detector(args, keep_reference=False)  # scoring only: half the memory
        apply_decision_options(detector, args)
        fields = csv_fields(detector.decision.reports_threshold, args.stability, trust is not None)
        if plan is not None:
            # Only now are the columns of this run known (a calibrated model adds two): a
            # file with others is refused before anything is scored or cut off.
            if fmt == "csv":
                fields = resumed_fields(fields, plan.earlier.columns)  # an older file: its own columns
                check_columns(output, plan.earlier, fields)
            drop_unfinished(output, plan.earlier)
    except CLIError as e:
        return fail(str(e))
    detector.max_pixels = args.max_pixels
    detector.max_bytes = args.max_bytes
    mode = "a" if args.resume else "w"
    # File names need not be UTF-8: csv writes their bytes as they are (json escapes them).
    errors = "surrogateescape" if fmt == "csv" else "strict"
    stdout_errors = None
    if output is not None:
        stream = open(output, mode, encoding="utf-8", errors=errors, newline="")
    else:
        stream = sys.stdout
        if fmt == "csv" and hasattr(stream, "reconfigure"):  # a real console stream; set back below
            stdout_errors = stream.errors
            stream.reconfigure(errors=errors)
    writer = _Writer(stream, fmt, args.blocks, header=header, fields=fields)
    add = writer.add
    provenances = None
    if trust is not None:
        from ..provenance.records import read_files

        # read in a background thread, ahead of the scoring, in the same order
        provenances = read_files(paths, trust, max_bytes=args.max_bytes)

        def add(record: dict, provenance=None) -> None:
            writer.add(_with_provenance(record, provenance, fmt))
    n_failed = n_written = n_pixels = n_bytes = 0
    # SIGTERM (kill, a CI timeout, a service manager) stops the run as Ctrl-C does: the records
    # written stay, the decoding workers are stopped, and the resume hint is printed.
    with sigterm_as_interrupt():
        try:
            from ..inference.detector import Prediction

            for path, reason in unreadable:  # folders that could not be listed
                add(Prediction(path=path, error=reason, error_kind="unreadable").to_dict(with_blocks=args.blocks))
                n_failed += 1
            for pred in detector.predict_iter(
                paths,
                batch_size=args.batch_size,
                decode=decode_options(args, detector),
                progress=not args.no_progress and sys.stderr.isatty(),
                total=len(paths),
                stability=args.stability,
            ):
                n_failed += pred.error is not None
                n_pixels += pred.error_kind == "too_many_pixels"
                n_bytes += pred.error_kind == "too_large"
                record = pred.to_dict(with_blocks=args.blocks)
                if provenances is not None:
                    add(record, next(provenances))
                else:
                    add(record)
                n_written += 1
        except KeyboardInterrupt:
            if args.output and fmt in ("jsonl", "csv"):
                print(f"rine: {n_written} of {len(paths)} records written to {args.output}; run the same command "
                      "with --resume to score the rest", file=sys.stderr)
            raise
        finally:
            if provenances is not None:
                provenances.close()
            writer.close()
            if output is not None:
                stream.close()
            elif stdout_errors is not None:
                stream.reconfigure(errors=stdout_errors)
    if n_failed:
        print(f"rine: {n_failed} of {plural(len(paths) + len(unreadable), 'input')} could not be scored (see their "
              f"error field){_limit_hint(n_pixels, n_bytes)}", file=sys.stderr)
    return 1 if n_failed or failed_before else 0
