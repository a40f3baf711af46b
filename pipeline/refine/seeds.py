"""Confident seeds from CAMs: (H, W) uint8 maps with 0 = background, k = class k, 255 = unsure.

Seed makers share one interface (:class:`SeedMaker`) and are registered in
``pipeline.registry.REFINERS``; ``crf.mode`` picks one by name, so a plugin can add its own
(entry point ``refiner.<name>`` in group ``wsss.plugins``, or a dotted path).

- ``affinitynet`` (Ahn & Kwak 2018): background score (1 - max CAM)^alpha with a low alpha
  (``crf.alpha_fg``, confident foreground) and a high alpha (``crf.alpha_bg``, confident
  background); each score stack goes through the dense CRF.
- ``irnet`` (Ahn et al. 2019): foreground where CAM >= ``crf.fg_threshold``, background where
  max CAM < ``crf.bg_threshold``; each hard labelling goes through a label CRF (``crf.gt_prob``).

Both make a foreground-confident labelling ``fg`` and a background-confident labelling ``bg``;
``crf.merge`` combines them (:func:`merge_seeds`): ``published`` as each paper's code does
(PSA: class where ``fg`` says a class, background where ``bg`` says background, which wins;
IRNet: class where ``fg`` says a class, background only where both say background), ``agree``:
the common label where they agree. Everything else is 255.

``crf.thresholds: cam_sweep`` sets both thresholds from the CAM's own best background threshold
t* (the train sweep of make_cam, ``metrics/cam.json``): fg = ``crf.fg_ratio`` x t*, bg =
``crf.bg_ratio`` x t*, so seeds follow how broad a classifier's CAMs are instead of one fixed
number (IRNet's published 0.30 / 0.05 at its t* = 0.15 are the ratios 2 and 1/3).

With ``crf.enabled: false`` no CRF runs and the seeds are the plain thresholds
(:func:`threshold_seeds`): argmax class where max CAM >= ``crf.fg_threshold``, background where
max CAM < ``crf.bg_threshold``, 255 in between.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.labels import IGNORE_INDEX, grid_to_image, label_scores, present_classes, to_class_labels, with_background
from pipeline.refine.runner import (ImageTask, open_prepared, open_store, read_cams, required_cam_threshold,
                                    saliency_store_fingerprint, write_scored_label_store)
from pipeline.refine.crf import CrfSettings, crf_argmax, label_crf
from pipeline.registry import REFINERS, check_options
from pipeline.saliency.rules import saliency_for, seeds_with_saliency
from pipeline.saliency.store import read_saliency


MERGE_RULES = ("published", "agree")


def agreeing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two label maps -> their common label where they agree, 255 where they differ."""
    return np.where(a == b, a, IGNORE_INDEX).astype(np.uint8)


def merge_seeds(fg: np.ndarray, bg: np.ndarray, rule: str, background_wins: bool) -> np.ndarray:
    """Combine a foreground-confident and a background-confident labelling (channel indices, 0 =
    background) into seeds with 255 = unsure.

    ``published``: a class where ``fg`` has one, 255 where ``fg`` says background, then background
    where ``bg`` says background: everywhere with ``background_wins`` (PSA), else only where ``fg``
    says background too (IRNet's cam_to_ir_label). ``agree``: :func:`agreeing`."""
    if rule == "agree":
        return agreeing(fg, bg)
    if rule != "published":
        raise ValueError(f"param crf.merge: {rule!r} is not one of {list(MERGE_RULES)}")
    out = np.where(fg == 0, IGNORE_INDEX, fg)
    out = np.where((bg == 0) & (background_wins | (fg == 0)), 0, out)
    return out.astype(np.uint8)


def threshold_labels(cams: np.ndarray, threshold: float) -> np.ndarray:
    """(K, H, W) -> channel index map: 0 where max < threshold, else 1 + argmax."""
    if len(cams) == 0:
        return np.zeros(cams.shape[1:], np.int64)
    return np.where(cams.max(0) >= threshold, cams.argmax(0) + 1, 0)


class SeedMaker(ABC):
    """Makes one image's seed map from its CAMs.

    Built once per process from the ``crf`` params namespace; called per image with
    ``image`` (H, W, 3) uint8, ``cams`` (K, H, W) float32 in [0, 1] at full resolution for the
    image's K labelled classes, and ``classes`` (the K class indices). Returns (H, W)
    uint8 with 0 = background, class index, or 255 = unsure. ``background`` (set by the stage from
    the prepared data) is False for a dataset without background: then class 0 is a class like the
    others and a seed maker must not invent a background.
    """

    background: bool = True

    def __init__(self, crf: dict):
        self.crf = crf
        self.settings = CrfSettings.from_params(crf)

    @abstractmethod
    def __call__(self, image: np.ndarray, cams: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        ...


@REFINERS.register("affinitynet")
class AffinityNetSeeds(SeedMaker):
    def __call__(self, image, cams, classes):
        lo = crf_argmax(image, with_background(cams, self.crf["alpha_fg"]), self.settings)
        hi = crf_argmax(image, with_background(cams, self.crf["alpha_bg"]), self.settings)
        return to_class_labels(merge_seeds(lo, hi, self.crf["merge"], background_wins=True), classes)


@REFINERS.register("irnet")
class IRNetSeeds(SeedMaker):
    def __call__(self, image, cams, classes):
        n = len(classes) + 1
        gt_prob = self.crf["gt_prob"]
        fg = label_crf(image, threshold_labels(cams, self.crf["fg_threshold"]), n, gt_prob, self.settings)
        bg = label_crf(image, threshold_labels(cams, self.crf["bg_threshold"]), n, gt_prob, self.settings)
        return to_class_labels(merge_seeds(fg, bg, self.crf["merge"], background_wins=False), classes)


def margin_labels(image: np.ndarray, scores: np.ndarray, margin: float, settings: CrfSettings | None) -> np.ndarray:
    """Index map into ``scores`` (L, H, W): the top channel where it beats the runner-up by at least
    ``margin`` (and, with ``settings``, the dense CRF over these L channels agrees), 255 elsewhere.
    One channel: every pixel is it (there is nothing else the pixel can be)."""
    if len(scores) == 1:
        return np.zeros(scores.shape[1:], np.int64)
    top2 = np.partition(scores, len(scores) - 2, axis=0)[-2:]
    winner = scores.argmax(0)
    confident = top2[1] - top2[0] >= margin
    if settings is not None:
        confident &= crf_argmax(image, scores, settings) == winner
    return np.where(confident, winner, IGNORE_INDEX)


@REFINERS.register("margin")
class MarginSeeds(SeedMaker):
    """A seed where the image's top class beats its runner-up by ``crf.margin`` and the dense CRF over
    the image's labels agrees; 255 elsewhere. Without background the channels are the image's labels
    only (the seed rule for datasets where every pixel is a class); with background the channel
    (1 - max CAM)^alpha_fg competes like a class."""

    def __call__(self, image, cams, classes):
        scores = label_scores(cams, self.crf["alpha_fg"], self.background)
        return to_class_labels(margin_labels(image, scores, self.crf["margin"], self.settings), classes, self.background)


def threshold_seeds(cams: np.ndarray, classes: Sequence[int], fg_threshold: float, bg_threshold: float,
                    background: bool = True, margin: float = 0.0) -> np.ndarray:
    """No CRF: class where max CAM >= fg_threshold, background where < bg_threshold, else 255.
    Without background: the margin rule of :func:`margin_labels` without the CRF."""
    if not background:
        return to_class_labels(margin_labels(None, np.asarray(cams, np.float32), margin, None), classes, False)
    fg = threshold_labels(cams, fg_threshold)
    bg = threshold_labels(cams, bg_threshold)
    return to_class_labels(agreeing(fg, bg), classes)


def resolve_thresholds(crf: dict, cam_threshold: float | None) -> dict:
    """The ``crf`` params with the thresholds this run uses (see the module docstring).

    ``cam_threshold``: the best background threshold of the CAM sweep, or None when it is unknown
    (no GT to sweep on), which ``crf.thresholds: cam_sweep`` cannot work without."""
    if crf["thresholds"] == "fixed":
        return dict(crf)
    if crf["thresholds"] != "cam_sweep":
        raise ValueError(f"param crf.thresholds: {crf['thresholds']!r} is not 'fixed' or 'cam_sweep'")
    cam_threshold = required_cam_threshold("crf.thresholds", cam_threshold)
    fg = min(1.0, crf["fg_ratio"] * cam_threshold)
    bg = min(fg, crf["bg_ratio"] * cam_threshold)
    return {**crf, "fg_threshold": round(fg, 4), "bg_threshold": round(bg, 4)}


def seed_maker(crf: dict) -> SeedMaker:
    """The SeedMaker named by ``crf.mode`` (built-in, plugin or dotted path), built with
    ``crf.mode_options`` as keyword args (the built-ins take none)."""
    cls = REFINERS.get(crf["mode"])
    options = dict(crf.get("mode_options") or {})
    check_options(cls, options, "crf.mode_options", f"refiner {crf['mode']!r}")
    maker = cls(crf, **options)
    if not callable(maker):
        raise TypeError(f"param crf.mode: {crf['mode']!r} does not build a callable seed maker")
    return maker


@dataclass(frozen=True)
class SeedTask(ImageTask):
    """One image's seeds: the common task fields and the CRF params (and saliency when it is the cue)."""

    crf: dict
    saliency: dict | None = None  # the saliency params when crf.background_cue is saliency
    saliency_store: str | None = None  # the saliency stage's store (data/saliency.zarr) then


_MAKERS: dict[str, SeedMaker] = {}


def seeds_for_image(image: np.ndarray, cam_grid: np.ndarray, stride: int, classes: Sequence[int], crf: dict,
                    background: bool = True) -> np.ndarray:
    """One image: image (H, W, 3) uint8, cam_grid (K, gh, gw) for ``classes`` -> (H, W) uint8 seeds.
    ``background``: whether the dataset has a background class (the prepared data says)."""
    cams = grid_to_image(cam_grid, image.shape[:2], stride)
    if not crf["enabled"]:
        return threshold_seeds(cams, classes, crf["fg_threshold"], crf["bg_threshold"], background, crf["margin"])
    key = repr((sorted(crf.items()), background))
    if key not in _MAKERS:
        _MAKERS.clear()
        _MAKERS[key] = seed_maker(crf)
        _MAKERS[key].background = background
    return _MAKERS[key](image, cams, classes)


def make_seed(task: SeedTask) -> np.ndarray:
    """Worker entry (top level, picklable): loads the image and its CAMs itself -> (H, W) uint8."""
    prepared = open_prepared(task.prepared_dir, task.data)
    classes = present_classes(prepared.labels(task.image_id))
    cam_grid, stride = read_cams(task.cams_path, task.image_id, classes)
    image = prepared.image(task.image_id)
    seed = seeds_for_image(image, cam_grid, stride, classes, task.crf, prepared.background)
    if seed.shape != image.shape[:2]:
        raise ValueError(f"seed maker {task.crf['mode']!r} returned shape {seed.shape} for image {task.image_id!r} "
                         f"of size {image.shape[:2]}")
    if task.saliency is not None:
        sal = read_saliency(task.saliency_store, task.image_id)
        if sal is not None:
            cams = grid_to_image(cam_grid, image.shape[:2], stride) if task.saliency.get("seed_rule") == "guided" else None
            seed = seeds_with_saliency(seed, sal, task.saliency, cams, classes)
    return np.ascontiguousarray(seed, dtype=np.uint8)


def make_seed_store(prepared_dir: str | Path, data: dict, cams_path: str | Path, out_path: str | Path, crf: dict,
                    compute: dict, split: str | None = None, cam_threshold: float | None = None,
                    saliency: dict | None = None, saliency_store: str | Path | None = None) -> dict:
    """Seeds for every image of the CAM store's split -> ``out_path`` (array "seed").

    ``cam_threshold``: the CAM sweep's best threshold, for ``crf.thresholds: cam_sweep``;
    ``saliency``: the saliency params, used when ``crf.background_cue`` is ``saliency``, with the
    maps of ``saliency_store`` (the saliency stage's store).

    Per-image work runs through ``pipeline.compute.dask_client(compute.scheduler, compute.workers)``;
    shards are written as they finish (an interrupted run resumes). Returns the metrics dict:
    ConfusionMatrix summary over labelled pixels (``coverage`` = share labelled) plus run facts.
    """
    from pipeline.provenance import prepared_digest

    prepared = open_prepared(prepared_dir, data)
    cams = open_store(cams_path)
    split = split or cams.attrs.get("split") or data["train_split"]
    ids = list(cams.ids)
    crf = resolve_thresholds(crf, cam_threshold)
    if crf["enabled"]:
        seed_maker(crf)  # fail early on a bad crf.mode
    sal = saliency_for(crf.get("background_cue", "cam"), saliency, "crf.background_cue")
    inputs = {"cams": cams.attrs.get("fingerprint"), "prepared": prepared_digest(prepared_dir)}
    if sal is not None:
        inputs["saliency"] = saliency_store_fingerprint(saliency_store, "crf.background_cue")
    sal_store = str(Path(saliency_store).resolve()) if sal else None  # absolute: tasks may run in other folders
    tasks = [SeedTask(i, str(prepared_dir), data, str(cams_path), crf, sal, sal_store) for i in ids]
    attrs = {"kind": "seeds", "class_names": prepared.class_names, "stride": 1, "split": split,
             "params": {**crf, **({"saliency": sal} if sal else {})}, "method": crf["mode"] if crf["enabled"] else "threshold",
             "cams_fingerprint": cams.attrs.get("fingerprint"), "inputs": inputs}
    metrics = write_scored_label_store(prepared, ids, out_path, "seed", attrs, make_seed, tasks, compute, "crf seeds")
    metrics.update({"enabled": bool(crf["enabled"]), "mode": crf["mode"] if crf["enabled"] else "threshold",
                    "background_cue": crf.get("background_cue", "cam"),
                    **({"fg_threshold": crf["fg_threshold"], "bg_threshold": crf["bg_threshold"]} if prepared.background
                       else {"background": False, "margin": crf["margin"]}),
                    "precision": metrics["pixel_accuracy"], "images": len(ids), "split": split})
    return metrics


def run_crf(prepared, params: dict, cams: str | Path, out: str | Path, *, cam_threshold: float | None = None,
            saliency_store: str | Path | None = None) -> dict:
    """What the crf stage does: :func:`make_seed_store` from the CAM store ``cams`` into ``out``, plus
    the gallery of its first images. Returns {"metrics", "gallery" (an RGB array or None)}."""
    from pipeline.datasets.prepared import prepared_folder
    from pipeline.refine.gallery import refine_gallery

    prepared_dir, cams_path, out_path = prepared_folder(prepared), cams, out

    crf = params["crf"]
    metrics = make_seed_store(prepared_dir, params["data"], cams_path, out_path, crf, params["compute"],
                              cam_threshold=cam_threshold, saliency=params["saliency"], saliency_store=saliency_store)
    seeds = open_store(out_path)
    ids = seeds.ids[: params["data"]["gallery_ids"]]
    picture = (refine_gallery(open_prepared(prepared_dir, params["data"]), ids, open_store(cams_path),
                              {"CRF seeds": seeds}, crf["alpha_fg"]) if ids else None)
    return {"metrics": metrics, "gallery": picture}

