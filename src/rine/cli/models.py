"""`rine models`: list the named pretrained detectors and backbones."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list pretrained detectors and backbones", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # the torch-free registries: a static table must not wait seconds for torch to import
    from ..model.pretrained import PRETRAINED, rine_home
    from ..model.registry import BACKBONES

    print(f"Pretrained detectors (downloaded on first use into RINE_HOME={rine_home()}):")
    for s in PRETRAINED.values():
        print(f"  {s.name:<20} backbone {s.backbone:<10} {s.description}")
    print("Backbones:")
    for b in BACKBONES.values():
        print(f"  {b.name:<13} {b.hub_id}@{b.revision[:12]}  width {b.width}, {b.layers} blocks, input {b.image_size}")
    return 0
