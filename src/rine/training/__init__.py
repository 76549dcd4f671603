"""The research pipeline: cache backbone taps once, train heads on them, run hyper-parameter grids.

features.py   the tap store on disk and `extract_features`
losses.py     BCE + supervised contrastive loss
trainer.py    training a head on a store (the reference's recipe)
grid.py       the paper's hyper-parameter grid on one store
"""

from .._moved import lazy_reexport

# rine.training was the trainer module before the layout: its names resolve there, loaded on first use.
__getattr__, __dir__ = lazy_reexport(__name__, f"{__name__}.trainer")
