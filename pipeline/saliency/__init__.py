"""Saliency as the background cue: where the maps come from (:mod:`.sources`, :mod:`.u2netp`; their
shared error and scaling in :mod:`.maps`), the stage that keeps them in ``data/saliency.zarr``
(:mod:`.store`), and how seeds and the walk use them (:mod:`.rules`).

The package imports none of them: a stage imports the modules it uses, so its code closure (and its
``deps`` in dvc.yaml) holds only those.
"""
