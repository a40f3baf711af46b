"""How a saliency map decides the background, as the saliency-guided pipelines use it (the joint
saliency + WSSS paper, OAA, EPS: the background comes from an off-the-shelf salient-object detector).

Seeds (``crf.background_cue: saliency``; ``saliency.seed_rule`` picks the rule, applied to the
seeds the CAM rule made):

- ``override``: background where saliency < ``bg_threshold`` whatever the CAM says; a pixel the
  CAM rule calls background but whose saliency >= ``fg_threshold`` becomes 255.
- ``guided``: a pixel that is not salient (< ``bg_threshold``) is background unless a class's CAM
  is very confident there (>= ``cam_confident``: it keeps the CAM rule's seed); a salient pixel
  (>= ``fg_threshold``) the CAM rule did not give a class takes the image's strongest class where
  that CAM is >= ``cam_min``, and stays 255 (unsure) where no class explains it; in between the
  CAM rule's seed stands.

The walk's background channel (``rw.background_cue``): ``cam``, (1 - max CAM)^alpha;
``saliency``, 1 - saliency; ``saliency_cam``, both together: (1 - saliency)^(1 - w) x
((1 - max CAM)^alpha)^w with w = ``saliency.cam_weight``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.labels import IGNORE_INDEX

SEED_RULES = ("override", "guided")
WALK_CUES = ("cam", "saliency", "saliency_cam")


def saliency_for(cue: str, saliency: dict | None, param: str) -> dict | None:
    """The saliency params a stage passes to its workers: ``saliency`` when its background cue
    (``param``, e.g. ``crf.background_cue``) uses saliency, else None."""
    if cue == "cam":
        return None
    if cue not in WALK_CUES:
        raise ValueError(f"param {param}: {cue!r} is not one of {list(WALK_CUES)}")
    if saliency is None:
        raise ValueError(f"param {param}: {cue} needs the saliency params")
    return saliency


def uses_saliency(params: dict) -> bool:
    """Whether any stage takes its background cue from saliency."""
    return params["crf"]["background_cue"] != "cam" or params["rw"]["background_cue"] != "cam"


def seeds_with_saliency(seeds: np.ndarray, saliency: np.ndarray, sal: dict, cams: np.ndarray | None = None,
                        classes: Sequence[int] = ()) -> np.ndarray:
    """(H, W) uint8 seeds of a CAM rule + (H, W) saliency in [0, 1] -> seeds by ``sal["seed_rule"]``.
    ``guided`` needs ``cams`` (K, H, W) in [0, 1] for ``classes`` (the K class indices)."""
    rule = sal.get("seed_rule", "override")
    if rule == "override":
        out = np.where((seeds == 0) & (saliency >= sal["fg_threshold"]), IGNORE_INDEX, seeds)
        return np.where(saliency < sal["bg_threshold"], 0, out).astype(np.uint8)
    if rule != "guided":
        raise ValueError(f"param saliency.seed_rule: {rule!r} is not one of {list(SEED_RULES)}")
    if cams is None or len(cams) != len(classes):
        raise ValueError("saliency.seed_rule guided needs the image's CAMs, one per labelled class")
    if len(classes) == 0:
        top = np.zeros(seeds.shape, np.float32)
        top_class = np.zeros(seeds.shape, np.uint8)
    else:
        top = cams.max(0)
        top_class = np.asarray(classes, np.uint8)[cams.argmax(0)]
    salient = saliency >= sal["fg_threshold"]
    out = seeds.copy()
    unexplained = salient & ((seeds == 0) | (seeds == IGNORE_INDEX))
    out[unexplained] = np.where(top[unexplained] >= sal["cam_min"], top_class[unexplained], IGNORE_INDEX)
    not_salient = saliency < sal["bg_threshold"]
    out[not_salient & (top < sal["cam_confident"])] = 0
    return out.astype(np.uint8)


def background_score(saliency: np.ndarray) -> np.ndarray:
    """The walk's background channel from saliency alone: 1 - saliency (float32)."""
    return (1.0 - saliency).astype(np.float32)


def walk_background(cue: str, saliency: np.ndarray, cam_background: np.ndarray | None, sal: dict) -> np.ndarray:
    """The walk's background channel (H, W) float32 for ``rw.background_cue`` ``cue`` from the
    saliency map and the CAM's own background (1 - max CAM)^alpha at the same resolution (read
    only by ``saliency_cam``)."""
    if cue == "saliency":
        return background_score(saliency)
    if cue != "saliency_cam":
        raise ValueError(f"param rw.background_cue: {cue!r} does not use saliency (one of {list(WALK_CUES)})")
    w = float(sal["cam_weight"])
    return (background_score(saliency) ** (1.0 - w) * np.clip(cam_background, 0.0, 1.0) ** w).astype(np.float32)
