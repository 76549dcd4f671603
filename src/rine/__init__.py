"""rine: synthetic-image detection with RINE (ECCV 2024), faithful to the reference code.

Each name is imported from the module that defines it; this package re-exports nothing (so
that `import rine` and `rine --help` load no torch). The entry points:

    from rine.inference.detector import Detector    Detector.from_pretrained(name_or_folder)
    from rine.model.backbones import load_backbone  -> TappedCLIPVision ([batch, blocks, width] taps)
    from rine.model.head import RINEHead            RINEHead(HeadConfig), official checkpoint key names
    from rine.model.checkpoints import load_pretrained, save_pretrained
    from rine.metrics import compute_metrics

docs/architecture.md maps the layers and modules.
"""

__version__ = "0.1.0"
