"""Reading images from Parquet row groups against reading the same images from files.

Writes N JPEG images both as files and as one Parquet file (a datasets.Image struct
column, row groups of --group rows), then times, in this process:

  A. files:   `load_image(path)` of every file (the folder layouts' path);
  B. parquet: `ParquetSource.iter_images()` + `open_source(bytes)` of every row;
  C. parquet, bytes only: `iter_images()` without decoding (the reader's own cost).

and prints images/s and the ratios B/A and C/A, measured in the same run, with the peak
RSS growth of each pass (ru_maxrss, this process; meaningful as "did it grow").

  python benchmarks/parquet_stream.py                      # 2000 images of 512x384
  python benchmarks/parquet_stream.py --n 64 --size 64     # smoke run
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rine.data.images import load_image
from rine.data.parquet import ParquetColumns, open_source, read_parquet_dataset


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512, help="image width (height 3/4 of it)")
    ap.add_argument("--group", type=int, default=100, help="rows per row group (datasets writes ~100 for images)")
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, blobs = [], []
        for i in range(args.n):
            buf = io.BytesIO()
            arr = rng.integers(0, 256, (args.size * 3 // 4, args.size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            p = tmp / "files" / f"{i:06d}.jpg"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(buf.getvalue())
            paths.append(p)
            blobs.append(buf.getvalue())
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        schema = pa.schema([("image", image), ("label", pa.int64())])
        table = pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": [i % 2 for i in range(args.n)]},
                         schema=schema)
        pq.write_table(table, tmp / "data.parquet", row_group_size=args.group)
        del table, blobs
        (ts,) = read_parquet_dataset({"s": [tmp / "data.parquet"]}, name="bench", root=tmp, columns=ParquetColumns())

        def timed(name, fn):
            before, t0 = _rss(), time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            print(f"{name:22s} {args.n / dt:8.1f} img/s   peak RSS +{(_rss() - before) / 2**20:6.1f} MiB")
            return dt

        load_image(paths[0])  # warm-up: Pillow's plugins, the page cache of the files
        sum(len(s) for s in ts.source.iter_images())
        a = timed("A files", lambda: [load_image(p) for p in paths])
        b = timed("B parquet + decode", lambda: [open_source(s) for s in ts.source.iter_images()])
        c = timed("C parquet bytes only", lambda: sum(len(s) for s in ts.source.iter_images()))
        print(f"ratio B/A (time) {b / a:.2f}   C/A {c / a:.2f}")


if __name__ == "__main__":
    main()
