"""Durable file writes: a file is either its old content or its complete new content, also
after a crash or `kill -9` at any point.

The protocol, once for the package: write a temporary file beside the target, flush and
fsync it, rename it over the target (atomic on POSIX within one folder), fsync the folder
so that the rename itself survives a power loss. Readers never see a half-written file;
a crash leaves at most a stale `*.tmp` file beside it.

    atomic_write(path, b"...")                 bytes, or text (UTF-8)
    atomic_write_json(path, {"a": 1})          JSON, indented, with a final newline
    with atomic_file(path) as tmp: lib.save(tmp)   for libraries that write by file name
    append_durably(path, b"line\\n")          an fsynced append (commit logs)

Standard library only: `import rine` and decoding workers import this module.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be
    opened or fsynced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a name of its own, `<name>.<random><suffix>`, so
    that concurrent writers of one target never share it); when the block ends without an
    exception the file written there is fsynced and renamed over `path`, and the folder
    fsynced. On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any], encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically and durably (see the module docstring).

    data: bytes; str (encoded with `encoding`); or a function that writes into the open
    binary file (`lambda f: np.save(f, array)`), for content too large to hold as bytes."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
        f.flush()
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON (UTF-8, a final newline) written with `atomic_write`."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def append_durably(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` and fsync it before returning: a line that is in the file
    after this call stays there after a crash. A crash during the call can leave a torn
    tail, which readers of an append-only log must ignore (a line without its newline)."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
