"""`rine detect`: score images for being synthetic.

Examples:
  rine detect photo.jpg                       # default model, downloaded on first use
  rine detect photos/ 'shots/**/*.png' --output scores.csv   # format from the file name
  rine detect img.jpg --backbone ./clip-vit-large-patch14 --head ./model_4class_trainable.pth
  rine detect archive/ -o scores.jsonl --resume   # after an interruption: score only the rest
  rine detect photos/ --model my-rine/            # a model calibrated by rine calibrate: its threshold

Exit status: 0 all files scored, 1 some files could not be read (they get an error
record; with --resume, also those of the earlier run), 2 bad usage or missing weights.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl", "csv")
CSV_FIELDS = ("path", "prob_fake", "logit", "is_fake", "error")
# a calibrated model (or --threshold / --uncertain-band) adds the cut and the verdict
CSV_FIELDS_DECIDED = (*CSV_FIELDS, "threshold", "verdict")


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
    add_decision_options(p.add_argument_group("decision"))
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default=None, help="default: from the --output file's name (.csv, .json; else jsonl), "
                   "or a table on a terminal, jsonl otherwise")
    o.add_argument("--output", "-o", metavar="FILE", help="write results here instead of standard output")
    o.add_argument("--blocks", action="store_true", help="include each image's per-block contribution (json/jsonl)")
    o.add_argument(
        "--resume",
        action="store_true",
        help="append to --output (jsonl or csv) and skip the inputs that already have a record "
        "there (relative and absolute spellings of a path are one input; a symlink is its own), "
        "e.g. after an interrupted run; an unfinished last record is replaced. Error "
        "records count as done (and in the exit status): remove their lines to retry them. "
        "A csv of other columns (threshold and verdict come with a calibrated model, --threshold "
        "or --uncertain-band) is refused. Without --resume, --output is overwritten",
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

    def __init__(self, stream: TextIO, fmt: str, with_blocks: bool, header: bool = True, decided: bool = False):
        self.stream, self.fmt, self.with_blocks = stream, fmt, with_blocks
        self.rows: list[dict] = []
        if fmt == "csv":
            fields = CSV_FIELDS_DECIDED if decided else CSV_FIELDS
            self.csv = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
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
            out.write(f"{path:<{width}}  {r['prob_fake']:>9.4f}  {verdict}\n")
    return out.getvalue()


def _is_cut_record(tail: bytes, fmt: str, first_line: bool) -> bool:
    """Whether `tail` (the bytes after the last line end) can be the start of a record that
    rine detect was writing when it was killed -- and nothing else, such as a line that
    someone appended by hand, which must not be deleted."""
    if fmt == "jsonl":
        return tail.startswith(b'{"path": ') or b'{"path": '.startswith(tail)
    if first_line:  # a header, cut
        return any((",".join(f) + "\r\n").encode().startswith(tail) for f in (CSV_FIELDS, CSV_FIELDS_DECIDED))
    for cut in range(4):  # the last UTF-8 character may itself be cut
        try:
            text = tail[: len(tail) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    in_quotes = False
    for ch in text:  # the csv module writes line ends only inside quoted fields, or as \r\n
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return False
    fields = next(csv.reader(io.StringIO(text, newline="")), [])
    return len(fields) <= len(CSV_FIELDS_DECIDED)


@dataclass
class _Earlier:
    """What an earlier run left in its --output file."""

    done: dict[str, bool]  # path -> whether its record is an error
    columns: tuple[str, ...] | None  # a csv file's header (None: jsonl, or no whole line yet)
    complete: int  # bytes of whole records; what follows is an unfinished last record


def read_earlier(output: Path, fmt: str) -> _Earlier:
    """The records of `output`, the jsonl or csv file of an earlier run, without touching
    it; raises CLIError if `output` is not such a file. A last record without its line end
    (the run was killed while writing it) is not counted: `drop_unfinished` cuts it off."""
    if not output.exists():
        return _Earlier({}, None, 0)
    if not output.is_file():
        raise CLIError(f"--output {output} is not a file")
    data = output.read_bytes()
    end = b"\r\n" if fmt == "csv" else b"\n"  # the csv module ends rows with \r\n
    complete = data.rfind(end) + len(end) if end in data else 0
    redo = "; or drop --resume to start over (the file is then overwritten)"
    tail = data[complete:]
    if tail and not _is_cut_record(tail, fmt, first_line=complete == 0):
        raise CLIError(f"--resume: the last line of {output} is not a rine detect record: fix or remove it{redo}")
    try:
        text = data[:complete].decode("utf-8", "surrogateescape" if fmt == "csv" else "strict")
    except UnicodeDecodeError:
        raise CLIError(f"--resume: {output} is not a text file written by rine detect{redo}") from None
    done: dict[str, bool] = {}
    columns = None
    if fmt == "jsonl":
        for n, line in enumerate(text.split("\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[str(record["path"])] = bool(record.get("error"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CLIError(f"--resume: {output}, line {n}, is not a rine detect record: fix or remove it{redo}") from None
    else:
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = next(rows, None)
            if header is not None and tuple(header) not in (CSV_FIELDS, CSV_FIELDS_DECIDED):
                raise CLIError(f"--resume: {output} has the header {header}, not rine detect's {list(CSV_FIELDS)}{redo}")
            columns = None if header is None else tuple(header)
            for row in rows:
                if len(row) != len(header or CSV_FIELDS):
                    raise CLIError(f"--resume: {output}, line {rows.line_num}, is not a rine detect record: "
                                   f"fix or remove it{redo}")  # fmt: skip
                done[row[0]] = bool(row[CSV_FIELDS.index("error")])
        except csv.Error as e:
            raise CLIError(f"--resume: {output} cannot be read as csv ({e}){redo}") from None
    return _Earlier(done, columns, complete)


def drop_unfinished(output: Path, earlier: _Earlier) -> None:
    """Cut off the unfinished last record `read_earlier` found (it is scored again)."""
    if output.exists() and output.stat().st_size > earlier.complete:
        with output.open("r+b") as f:
            f.truncate(earlier.complete)
        print(f"rine: {output}: removed an unfinished last record (it is scored again)", file=sys.stderr)


def check_columns(output: Path, earlier: _Earlier, fields: tuple[str, ...]) -> None:
    """CLIError unless the csv header of `output` is `fields`, the columns this run writes:
    rows of another width appended under it would make a corrupt file."""
    if earlier.columns is None or earlier.columns == fields:
        return
    raise CLIError(
        f"--resume: {output} has the columns {','.join(earlier.columns)}, but this run writes "
        f"{','.join(fields)} (threshold and verdict come with a calibrated model, --threshold or "
        "--uncertain-band); appending would mix rows of two widths. The file is left as it was: "
        "write this run to a new file (another -o), rerun without --resume to score every input "
        "again (the file is then overwritten), or resume with the model and options of the first run"
    )


def format_for(output: str | None) -> str:
    """The format when --format is not given: from the --output file's name, else a table
    on a terminal and jsonl otherwise."""
    if output:
        return {".csv": "csv", ".json": "json", ".txt": "table"}.get(Path(output).suffix.lower(), "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


def _limit_hint(n_pixels: int, n_bytes: int) -> str:
    hints = [f"{n} over --{opt} (raise it to score them)" for n, opt in ((n_pixels, "max-pixels"), (n_bytes, "max-bytes")) if n]
    return "; " + ", ".join(hints) if hints else ""


def _place(path: str) -> str:
    """Where a path points, symlinks aside: `./dir/a.png`, `dir/a.png` and `/abs/dir/a.png`
    are one place (a symlink `z.png -> a.png` is another input, with its own record)."""
    return os.path.normcase(os.path.abspath(path))


def _sniff_format(output: Path) -> str | None:
    """jsonl or csv, from what an earlier run wrote at the start of `output` (None: unknown)."""
    try:
        with output.open("rb") as f:
            start = f.read(64)
    except OSError:
        return None
    if start.startswith(b"{"):
        return "jsonl"
    if start.startswith(",".join(CSV_FIELDS).encode()):
        return "csv"
    return None


def _first_seen(paths) -> tuple[list[str], int]:
    """Each place once, in first-seen order (the identity `--resume` uses: `_place`), and
    how many later duplicates were dropped (a folder and a file in it, `a.png` and `./a.png`)."""
    seen: set[str] = set()
    out: list[str] = []
    dropped = 0
    for path in paths:
        place = _place(path)
        if place in seen:
            dropped += 1
        else:
            seen.add(place)
            out.append(path)
    return out, dropped


def _report_scan(skipped: Skipped, n_duplicates: int) -> None:
    """What the expansion of the inputs left out, on stderr; -v lists the skipped files."""
    report_skipped(skipped, logger)
    if n_duplicates:
        print(f"rine: {plural(n_duplicates, 'duplicate input')} dropped (the same file given twice, or inside a "
              "folder also given): each file is scored once", file=sys.stderr)  # fmt: skip


@dataclass
class _ResumePlan:
    todo: list[str]  # inputs without a record
    unreadable: list[tuple[str, str]]  # unlistable folders without a record
    header: bool  # no whole line yet: csv needs its header
    failed_before: int  # inputs whose earlier record is an error
    earlier: _Earlier  # what the file holds (untouched until the run is known to go on)


def _plan_resume(output: Path, fmt: str, paths: list[str], unreadable: list[tuple[str, str]]) -> _ResumePlan:
    """What a --resume run has left to do, from the records in `output` (CLIError if it is
    not a file of ours); says so on stderr. The file is not changed."""
    earlier = read_earlier(output, fmt)
    recorded = earlier.done
    # An input's record: the one under its own spelling, else one under another spelling
    # of the same place (relative against absolute, `./`).
    by_place: dict[str, bool] = {}
    for path, is_error in recorded.items():
        by_place.setdefault(_place(path), is_error)

    def record_of(path: str) -> bool | None:
        return recorded[path] if path in recorded else by_place.get(_place(path))

    n_inputs = len(paths) + len(unreadable)
    plan = _ResumePlan(
        todo=[p for p in paths if record_of(p) is None],
        unreadable=[(p, why) for p, why in unreadable if record_of(p) is None],
        header=earlier.complete == 0,
        failed_before=sum(bool(record_of(p)) for p in [*paths, *(p for p, _ in unreadable)]),
        earlier=earlier,
    )
    n_todo = len(plan.todo) + len(plan.unreadable)
    if recorded and n_todo == n_inputs:
        print(f"rine: warning: {output} holds {len(recorded)} records, but none for these inputs. "
              "Relative paths are matched from the current folder: if the first run was started in "
              "another folder, run this one there", file=sys.stderr)  # fmt: skip
    errors = (f" ({plan.failed_before} of them errors, not retried: remove their lines to retry them)"
              if plan.failed_before else "")  # fmt: skip
    print(f"rine: resuming {output}: {n_inputs - n_todo} of {n_inputs} inputs already have "
          f"a record{errors}; scoring {n_todo}", file=sys.stderr)  # fmt: skip
    return plan


def run(args: argparse.Namespace) -> int:
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    try:
        output = check_output_file(args.output, "--output") if args.output else None
        if resolve_backend(args) == "torch":  # ONNX Runtime checks its own providers
            check_device(args.device)
    except CLIError as e:
        return fail(str(e))
    unreadable: list[tuple[str, str]] = []
    skipped = Skipped()
    paths, n_duplicates = _first_seen(expand_inputs(args.inputs, unreadable, skipped))
    firsts: dict[str, tuple[str, str]] = {}
    for path, why in unreadable:  # a folder given twice, unlistable: one record
        firsts.setdefault(_place(path), (path, why))
    unreadable = list(firsts.values())
    _report_scan(skipped, n_duplicates)
    if not paths and not unreadable:
        return fail("no input images found" + (f" ({skipped.summary()})" if skipped.total else ""))
    # Resuming: the file's own format first, so that runs started before the format followed
    # the file name (jsonl in a .json or .csv file) go on as they began.
    fmt = args.format or (args.resume and output and _sniff_format(output)) or format_for(args.output)
    header, failed_before, plan = True, 0, None
    if args.resume:
        if output is None:
            return fail("--resume needs --output FILE: the file of the run to resume")
        if fmt not in ("jsonl", "csv"):
            return fail(f"--resume needs --format jsonl or csv (written record by record), not {fmt}")
        try:
            plan = _plan_resume(output, fmt, paths, unreadable)
        except CLIError as e:
            return fail(str(e))
        if not plan.todo and not plan.unreadable:
            drop_unfinished(output, plan.earlier)
            return 1 if plan.failed_before else 0
        paths, unreadable, header, failed_before = plan.todo, plan.unreadable, plan.header, plan.failed_before
    try:
        detector = load_detector(args, keep_reference=False)  # scoring only: half the memory
        apply_decision_options(detector, args)
        decided = detector.decision.reports_threshold
        if plan is not None:
            # Only now are the columns of this run known (a calibrated model adds two): a
            # file with others is refused before anything is scored or cut off.
            if fmt == "csv":
                check_columns(output, plan.earlier, CSV_FIELDS_DECIDED if decided else CSV_FIELDS)
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
    writer = _Writer(stream, fmt, args.blocks, header=header, decided=decided)
    n_failed = n_written = n_pixels = n_bytes = 0
    # SIGTERM (kill, a CI timeout, a service manager) stops the run as Ctrl-C does: the records
    # written stay, the decoding workers are stopped, and the resume hint is printed.
    with sigterm_as_interrupt():
        try:
            from ..inference.detector import Prediction

            for path, reason in unreadable:  # folders that could not be listed
                writer.add(Prediction(path=path, error=reason).to_dict(with_blocks=args.blocks))
                n_failed += 1
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
                n_pixels += pred.error is not None and pred.error.startswith("too many pixels:")
                n_bytes += pred.error is not None and pred.error.startswith("file too large:")
                writer.add(pred.to_dict(with_blocks=args.blocks))
                n_written += 1
        except KeyboardInterrupt:
            if args.output and fmt in ("jsonl", "csv"):
                print(f"rine: {n_written} of {len(paths)} records written to {args.output}; run the same command "
                      "with --resume to score the rest", file=sys.stderr)  # fmt: skip
            raise
        finally:
            writer.close()
            if output is not None:
                stream.close()
            elif stdout_errors is not None:
                stream.reconfigure(errors=stdout_errors)
    if n_failed:
        print(f"rine: {n_failed} of {plural(len(paths) + len(unreadable), 'input')} could not be scored (see their "
              f"error field){_limit_hint(n_pixels, n_bytes)}", file=sys.stderr)  # fmt: skip
    return 1 if n_failed or failed_before else 0
