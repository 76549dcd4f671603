"""`rine detect --resume`: what an earlier run left in its --output file (jsonl or csv), and
what is left to do. The file is read without being touched; only `drop_unfinished` cuts off a
last record that a killed run was writing. Inputs are matched by place (`place_of`), not by
spelling."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.reencode import DEFAULT_CONDITIONS
from .common import CLIError

CSV_FIELDS = ("path", "prob_fake", "logit", "is_fake", "error")
# a calibrated model (or --threshold / --uncertain-band) adds the cut and the verdict
CSV_FIELDS_DECIDED = (*CSV_FIELDS, "threshold", "verdict")
# --stability: also the spread, the flips, the reason and each re-encoding's probability
CSV_FIELDS_STABILITY = (*CSV_FIELDS_DECIDED, "stability_spread", "stability_flips", "stability_reason",
                        *(f"stability_{c}" for c in DEFAULT_CONDITIONS))
# the error's stable token (rine.data.decoding.error_kind), beside the error text; files
# written before it existed lack it, and a --resume run goes on in the file's own columns
KIND = "error_kind"


def csv_fields(decided: bool, stability: bool, provenance: bool, error_kind: bool = True) -> tuple[str, ...]:
    """The columns a csv of this run has: the detector's (with error_kind after error, and
    with the cut and the verdict when calibrated, thresholded or --stability), the stability
    columns with --stability, then (unless --no-provenance) the provenance columns and the
    combined decision (rine.provenance.types.CSV_FIELDS)."""
    from ..provenance.types import CSV_FIELDS as PROVENANCE_FIELDS

    base = CSV_FIELDS_STABILITY if stability else CSV_FIELDS_DECIDED if decided else CSV_FIELDS
    if error_kind:
        base = (*CSV_FIELDS, KIND, *base[len(CSV_FIELDS):])
    return (*base, *PROVENANCE_FIELDS) if provenance else base


def resumed_fields(fields: tuple[str, ...], earlier_columns: tuple[str, ...] | None) -> tuple[str, ...]:
    """The columns to write: `fields` (csv_fields), or without error_kind when resuming a file
    written before that column existed and otherwise alike (every row as wide as its header)."""
    older = tuple(f for f in fields if f != KIND)
    return older if earlier_columns == older else fields


def known_headers() -> list[tuple[str, ...]]:
    """Every header rine detect writes, for recognising a csv (or a cut first line)."""
    return [csv_fields(d, s, p, k) for d in (False, True) for s in (False, True) for p in (False, True)
            for k in (False, True)]


def is_cut_record(tail: bytes, fmt: str, first_line: bool) -> bool:
    """Whether `tail` (the bytes after the last line end) can be the start of a record that
    rine detect was writing when it was killed -- and nothing else, such as a line that
    someone appended by hand, which must not be deleted."""
    if fmt == "jsonl":
        return tail.startswith(b'{"path": ') or b'{"path": '.startswith(tail)
    if first_line:  # a header, cut
        return any((",".join(f) + "\r\n").encode().startswith(tail) for f in known_headers())
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
    return len(fields) <= max(map(len, known_headers()))


@dataclass
class Earlier:
    """What an earlier run left in its --output file."""

    done: dict[str, bool]  # path -> whether its record is an error
    columns: tuple[str, ...] | None  # a csv file's header (None: jsonl, or no whole line yet)
    complete: int  # bytes of whole records; what follows is an unfinished last record


def read_earlier(output: Path, fmt: str) -> Earlier:
    """The records of `output`, the jsonl or csv file of an earlier run, without touching
    it; raises CLIError if `output` is not such a file. A last record without its line end
    (the run was killed while writing it) is not counted: `drop_unfinished` cuts it off."""
    if not output.exists():
        return Earlier({}, None, 0)
    if not output.is_file():
        raise CLIError(f"--output {output} is not a file")
    data = output.read_bytes()
    end = b"\r\n" if fmt == "csv" else b"\n"  # the csv module ends rows with \r\n
    complete = data.rfind(end) + len(end) if end in data else 0
    redo = "; or drop --resume to start over (the file is then overwritten)"
    tail = data[complete:]
    if tail and not is_cut_record(tail, fmt, first_line=complete == 0):
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
            if header is not None and tuple(header) not in known_headers():
                raise CLIError(f"--resume: {output} has the header {header}, not rine detect's {list(CSV_FIELDS)}{redo}")
            columns = None if header is None else tuple(header)
            for row in rows:
                if len(row) != len(header or CSV_FIELDS):
                    raise CLIError(f"--resume: {output}, line {rows.line_num}, is not a rine detect record: "
                                   f"fix or remove it{redo}")
                done[row[0]] = bool(row[CSV_FIELDS.index("error")])
        except csv.Error as e:
            raise CLIError(f"--resume: {output} cannot be read as csv ({e}){redo}") from None
    return Earlier(done, columns, complete)


def drop_unfinished(output: Path, earlier: Earlier) -> None:
    """Cut off the unfinished last record `read_earlier` found (it is scored again)."""
    if output.exists() and output.stat().st_size > earlier.complete:
        with output.open("r+b") as f:
            f.truncate(earlier.complete)
        print(f"rine: {output}: removed an unfinished last record (it is scored again)", file=sys.stderr)


def check_columns(output: Path, earlier: Earlier, fields: tuple[str, ...]) -> None:
    """CLIError unless the csv header of `output` is `fields`, the columns this run writes:
    rows of another width appended under it would make a corrupt file."""
    if earlier.columns is None or earlier.columns == fields:
        return
    raise CLIError(
        f"--resume: {output} has the columns {','.join(earlier.columns)}, but this run writes "
        f"{','.join(fields)} (threshold and verdict come with a calibrated model, --threshold or "
        "--uncertain-band, the stability columns with --stability, the provenance columns unless --no-provenance); appending would mix rows of two widths. The file is left as it was: "
        "write this run to a new file (another -o), rerun without --resume to score every input "
        "again (the file is then overwritten), or resume with the model and options of the first run"
    )


def place_of(path: str) -> str:
    """Where a path points, symlinks aside: `./dir/a.png`, `dir/a.png` and `/abs/dir/a.png`
    are one place (a symlink `z.png -> a.png` is another input, with its own record)."""
    return os.path.normcase(os.path.abspath(path))


def sniff_format(output: Path) -> str | None:
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


def first_seen(paths) -> tuple[list[str], int]:
    """Each place once, in first-seen order (the identity `--resume` uses: `place_of`), and
    how many later duplicates were dropped (a folder and a file in it, `a.png` and `./a.png`)."""
    seen: set[str] = set()
    out: list[str] = []
    dropped = 0
    for path in paths:
        place = place_of(path)
        if place in seen:
            dropped += 1
        else:
            seen.add(place)
            out.append(path)
    return out, dropped


@dataclass
class ResumePlan:
    todo: list[str]  # inputs without a record
    unreadable: list[tuple[str, str]]  # unlistable folders without a record
    header: bool  # no whole line yet: csv needs its header
    failed_before: int  # inputs whose earlier record is an error
    earlier: Earlier  # what the file holds (untouched until the run is known to go on)


def plan_resume(output: Path, fmt: str, paths: list[str], unreadable: list[tuple[str, str]]) -> ResumePlan:
    """What a --resume run has left to do, from the records in `output` (CLIError if it is
    not a file of ours); says so on stderr. The file is not changed."""
    earlier = read_earlier(output, fmt)
    recorded = earlier.done
    # An input's record: the one under its own spelling, else one under another spelling
    # of the same place (relative against absolute, `./`).
    by_place: dict[str, bool] = {}
    for path, is_error in recorded.items():
        by_place.setdefault(place_of(path), is_error)

    def record_of(path: str) -> bool | None:
        return recorded[path] if path in recorded else by_place.get(place_of(path))

    n_inputs = len(paths) + len(unreadable)
    plan = ResumePlan(
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
              "another folder, run this one there", file=sys.stderr)
    errors = (f" ({plan.failed_before} of them errors, not retried: remove their lines to retry them)"
              if plan.failed_before else "")
    print(f"rine: resuming {output}: {n_inputs - n_todo} of {n_inputs} inputs already have "
          f"a record{errors}; scoring {n_todo}", file=sys.stderr)
    return plan
