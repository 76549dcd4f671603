"""Images in: safe decoding with limits, crops and normalisation, dataset layouts, augmentations, perturbations.

images.py      open an image file or bytes safely (formats, pixel and byte limits)
preprocess.py  the reference's crops (centre, ten, resize) and CLIP normalisation
decoding.py    decoding in worker threads or processes, in order, crash-isolated
layouts.py     benchmark folder layouts (ufd20, synthbuster, genimage, ...) -> labelled image lists
datasets.py    training-set folders (ProGAN classes, ldm) -> labelled image lists
augment.py     the reference's training augmentations (blur, JPEG)
perturb.py     the paper's robustness perturbations
tap_store.py   the tap store on disk: format, StoreWriter, FeatureStore (training, eval cache, rine batch --taps)
tap_extract.py filling a tap store here: decode -> encode -> commit, resumable

Nothing here imports torch at module level: decoding workers import this package.
"""
