"""Build hook for rine's one optional C extension; everything else is in pyproject.toml.

`rine.data._jpeg_crop` (crop-aware JPEG decoding over the system libjpeg-turbo) is
optional: without a C compiler or the libjpeg headers (Debian: libjpeg62-turbo-dev) the
install still succeeds and rine decodes every image with Pillow, as before.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rine.data._jpeg_crop",
            sources=["src/rine/data/_jpeg_crop.c"],
            libraries=["jpeg"],
            optional=True,  # a failed build is a warning, not a failed install
        )
    ]
)
