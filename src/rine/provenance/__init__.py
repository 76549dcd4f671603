"""What an image file declares about its origin, and what of that can be verified.

`reader.read_provenance(data)` reads C2PA Content Credentials (`credentials.py`, on
c2pa-python), XMP (`xmp.py`), PNG text chunks (`pngtext.py`), EXIF (`exif.py`) and the Stable
Diffusion invisible watermarks (`watermark.py`) into a `types.Provenance`; `decision.combine`
puts it beside a detector's verdict, `records` into scoring records. Known generator signatures
are data in `catalogue.py`. Nothing here imports torch or loads a model: `rine provenance`
works before any weights are downloaded.

Layer: beside `data/` (it reads files, as `data/` does) and imports nothing above it.
"""
