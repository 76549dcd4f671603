"""The research pipeline: cache backbone taps once, train heads on them, run hyper-parameter grids.

features.py   `extract_features`: a backbone's taps into a tap store (`rine.data.tap_store`)
losses.py     BCE + supervised contrastive loss
trainer.py    training a head on a store (the reference's recipe)
grid.py       the paper's hyper-parameter grid on one store
"""
