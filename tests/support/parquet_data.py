"""Tiny Parquet image datasets in the schemas of the Hub benchmarks, written by the tests.

* OpenSDID (`write_opensdi`): `key` string, `image` and `mask` as datasets.Image structs
  {bytes, path}, `label` 0 real / 1 fake; fakes are global (full mask) or partial
  (inpainted: a mask with a box); real rows have a null mask; one row can hold a corrupt
  image. Files `data/<split>-NNNNN-of-NNNNN.parquet` and a README whose `configs` name them.
* Community Forensics (`write_commfor`): `image_data` bytes, `label`, `model_name`.
* A custom schema (`write_custom`): other column names, text labels, a struct with a path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_STRUCT = None  # set lazily: pyarrow is imported inside the functions


def png_bytes(seed: int, size=(48, 40), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def mask_bytes(kind: str, size=(48, 40)) -> bytes:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    if kind == "global":
        m[:] = 255
    else:  # partial: an inpainted box
        m[8:24, 10:30] = 255
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, "PNG")
    return buf.getvalue()


def _image_type():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def opensdi_rows(split: str, n: int, seed: int, corrupt: set[int] = frozenset()) -> list[dict]:
    rows = []
    for i in range(n):
        label = i % 2  # alternate real / fake
        data = b"\x89PNG\r\n\x1a\n truncated" if i in corrupt else png_bytes(seed * 1000 + i, fmt="PNG" if i % 3 else "JPEG")
        mask = None if label == 0 else {"bytes": mask_bytes("global" if i % 4 == 1 else "partial"), "path": None}
        rows.append({"key": f"{split}_{i:05d}", "image": {"bytes": data, "path": f"{i}.png"}, "mask": mask,
                     "label": label})
    return rows


def write_table(path: Path, rows: list[dict], schema, row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)


OPENSDI_CARD = """---
dataset_info:
  features:
  - name: key
    dtype: string
  - name: image
    dtype: image
  - name: mask
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': real
          '1': fake
configs:
- config_name: default
  data_files:
{files}
---
# tiny OpenSDID stand-in
"""


def write_opensdi(root: Path, splits: dict[str, list[int]], corrupt: dict[str, set[int]] | None = None,
                  row_group_size: int = 3, card: bool = True) -> dict[str, list[dict]]:
    """splits: {split: [rows per file]} -> the rows written, per split (in file order)."""
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("image", _image_type()), ("mask", _image_type()), ("label", pa.int64())])
    written: dict[str, list[dict]] = {}
    for si, (split, per_file) in enumerate(splits.items()):
        rows = opensdi_rows(split, sum(per_file), seed=si + 1, corrupt=(corrupt or {}).get(split, set()))
        written[split] = rows
        start = 0
        for k, n in enumerate(per_file):
            write_table(root / "data" / f"{split}-{k:05d}-of-{len(per_file):05d}.parquet", rows[start:start + n],
                        schema, row_group_size)
            start += n
    if card:
        files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
        (root / "README.md").write_text(OPENSDI_CARD.format(files=files), encoding="utf-8")
    return written


def write_commfor(root: Path, generators: dict[str, tuple[int, int]], files: int = 2) -> list[dict]:
    """generators: {model_name: (n_real, n_fake)}; rows interleaved across `files` files."""
    import pyarrow as pa

    schema = pa.schema([("image_data", pa.binary()), ("label", pa.int64()), ("model_name", pa.string()),
                        ("image_name", pa.string())])
    rows = []
    for gi, (gen, (n_real, n_fake)) in enumerate(generators.items()):
        for i in range(n_real + n_fake):
            rows.append({"image_data": png_bytes(5000 + gi * 100 + i, fmt="JPEG"), "label": int(i >= n_real),
                         "model_name": gen, "image_name": f"{gen}_{i}.jpg"})
    order = list(range(len(rows)))
    np.random.default_rng(0).shuffle(order)  # generators interleaved within files
    rows = [rows[i] for i in order]
    per = -(-len(rows) // files)
    for k in range(files):
        write_table(root / "data" / f"eval-{k:05d}-of-{files:05d}.parquet", rows[k * per:(k + 1) * per], schema, 4)
    return rows


def write_custom(root: Path, n: int) -> list[dict]:
    """Columns `picture` (struct: even rows bytes, odd rows a path to a file beside), `verdict`
    ("authentic"/"synthetic"), `gen`; one row whose path leads outside the folder."""
    import pyarrow as pa

    schema = pa.schema([("picture", _image_type()), ("verdict", pa.string()), ("gen", pa.string())])
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        data = png_bytes(9000 + i)
        if i % 2:
            (root / "images" / f"{i}.png").write_bytes(data)
            picture = {"bytes": None, "path": f"images/{i}.png"}
        else:
            picture = {"bytes": data, "path": None}
        rows.append({"picture": picture, "verdict": "synthetic" if i % 3 == 0 else "authentic",
                     "gen": "alpha" if i < n // 2 else "beta"})
    rows.append({"picture": {"bytes": None, "path": "../../etc/passwd"}, "verdict": "authentic", "gen": "beta"})
    write_table(root / "train" / "part-0.parquet", rows, schema, 2)
    return rows
