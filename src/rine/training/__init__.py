"""The research pipeline: cache backbone taps once, train heads on them, run hyper-parameter grids.

features.py   the tap store on disk and `extract_features`
losses.py     BCE + supervised contrastive loss
trainer.py    training a head on a store (the reference's recipe)
grid.py       the paper's hyper-parameter grid on one store
"""

from .trainer import *  # noqa: F403  (rine.training was the trainer module before the layout)
