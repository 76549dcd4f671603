"""`rine extract`: a backbone's taps of a training set into a tap store, once per image view.

The backbone is frozen, so its taps of an image view never change: extracting them once
and training the head on the stored taps is the same computation as running the encoder
in every training step. The store's format, writer and reader are `rine.data.tap_store`;
the decode -> encode -> commit loop is `rine.data.tap_extract`; this module adapts a
backbone to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import Item
from ..data.decoding import DecodeOptions
from ..data.preprocess import normalize
from ..data.tap_extract import MakeViews, extract_taps
from ..data.tap_store import FeatureStore


def extract_features(
    backbone,
    items: Sequence[Item],
    out_dir: str | Path,
    make_views: MakeViews,
    transform_id: str | None = None,
    views: int = 1,
    seed: int = 0,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_size: int = 1024,
    decode: DecodeOptions | None = None,
    progress: bool = False,
    extra_meta: dict[str, Any] | None = None,
    sources: Callable[[int, int], Iterator[Any]] | None = None,
) -> FeatureStore:
    """Run `backbone` over `items` x `views` and write (or complete) the store at `out_dir`
    (`rine.data.tap_extract.extract_taps`, whose docstring has the arguments).

    backbone: a `TappedCLIPVision` (or anything with its `source`, `revision`, `n_blocks`,
    `width`, `image_size` and `__call__`: normalised pixels [B, 3, S, S] -> taps [B, blocks,
    width]); its `mean`/`std` normalise the views (CLIP's when absent)."""
    device = next(backbone.parameters()).device
    mean, std = backbone_mean(backbone), backbone_std(backbone)

    @torch.no_grad()
    def encode(views_uint8: np.ndarray) -> np.ndarray:  # [n, S, S, 3] -> [n, blocks, width]
        pixels = normalize(torch.from_numpy(views_uint8), mean, std).to(device)
        return backbone(pixels).float().cpu().numpy()

    backbone_meta = {"backbone": str(backbone.source), "revision": backbone.revision, "blocks": int(backbone.n_blocks),
                     "width": int(backbone.width), "image_size": int(backbone.image_size)}
    return extract_taps(encode, backbone_meta, items, out_dir, make_views, transform_id=transform_id, views=views,
                        seed=seed, dtype=dtype, batch_size=batch_size, shard_size=shard_size, decode=decode,
                        progress=progress, extra_meta=extra_meta, sources=sources)


def backbone_mean(backbone) -> tuple[float, float, float]:
    from ..config import CLIP_MEAN

    return getattr(backbone, "mean", CLIP_MEAN)


def backbone_std(backbone) -> tuple[float, float, float]:
    from ..config import CLIP_STD

    return getattr(backbone, "std", CLIP_STD)
