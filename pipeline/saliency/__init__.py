"""Saliency as the background cue: where the maps come from (:mod:`.sources`, :mod:`.u2netp`), the
stage that keeps them in ``data/saliency.zarr`` (:mod:`.store`), and how seeds and the walk use
them (:mod:`.rules`)."""
from pipeline.saliency.maps import SaliencyError
from pipeline.saliency.rules import (SEED_RULES, WALK_CUES, background_score, saliency_for, seeds_with_saliency,
                                     uses_saliency, walk_background)
from pipeline.saliency.sources import SOURCES, SaliencySource, read_saliency_png, saliency_digest, spectral_residual
from pipeline.saliency.store import make_saliency_store, read_saliency, write_saliency_pngs

__all__ = ["SEED_RULES", "SOURCES", "WALK_CUES", "SaliencyError", "SaliencySource", "background_score",
           "make_saliency_store", "read_saliency", "read_saliency_png", "saliency_digest", "saliency_for",
           "seeds_with_saliency", "spectral_residual", "uses_saliency", "walk_background", "write_saliency_pngs"]
