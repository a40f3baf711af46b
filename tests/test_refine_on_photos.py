"""Refinement beats a blurry CAM on real-looking images (tests/fixtures/photos: textured objects on
mottled backgrounds, made by make_fixture.py there).

The CAMs are the GT blurred and spread past the object, the way a stride-16 classifier's maps
look on photos. With the real-photo settings (IRNet seeds with thresholds from the CAM sweep,
background from the CAM sweep in the walk) the seeds must be more precise than the CAM and the
walk must raise the mIoU, using affinities that follow the image's colours.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.cam.evaluate import ThresholdSweep, threshold_range
from pipeline.config import defaults
from pipeline.labels import grid_to_image
from pipeline.metrics import ConfusionMatrix
from pipeline.models.pairs import pair_offsets
from pipeline.refine.random_walk import pseudo_mask, resolve_background
from pipeline.refine.seeds import resolve_thresholds, seeds_for_image

FIXTURE = Path(__file__).parent / "fixtures" / "photos"
STRIDE = 4
NUM_CLASSES = 3  # background + two object classes


def load_fixture():
    out = []
    for n in range(4):
        image = cv2.cvtColor(cv2.imread(str(FIXTURE / f"{n}.png")), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(FIXTURE / f"{n}_mask.png"), cv2.IMREAD_GRAYSCALE)
        out.append((image, mask))
    return out


def blurry_cams(mask: np.ndarray, classes: list[int]) -> np.ndarray:
    """(K, H/4, W/4) max-normalised maps: each class's GT shifted a little, blurred wide, then
    averaged onto the stride-4 grid, as a coarse classifier's CAM."""
    h, w = mask.shape
    maps = []
    for c in classes:
        m = np.roll((mask == c).astype(np.float32), (6, -8), axis=(0, 1))
        m = cv2.GaussianBlur(m, (0, 0), 14.0)
        m = cv2.resize(m, (w // STRIDE, h // STRIDE), interpolation=cv2.INTER_AREA)
        maps.append(m / m.max())
    return np.stack(maps)


def colour_affinities(image: np.ndarray, offsets, sigma: float = 12.0) -> torch.Tensor:
    """(P, h, w) affinities on the stride grid from the cells' mean colours: exp(-mean |dc| / sigma)."""
    h, w = image.shape[0] // STRIDE, image.shape[1] // STRIDE
    cells = cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    aff = np.zeros((len(offsets), h, w), np.float32)
    for p, (dy, dx) in enumerate(offsets):
        for y in range(max(0, -dy), min(h, h - dy)):
            for x in range(max(0, -dx), min(w, w - dx)):
                aff[p, y, x] = np.exp(-np.abs(cells[y, x] - cells[y + dy, x + dx]).mean() / sigma)
    return torch.from_numpy(aff)


@pytest.fixture(scope="module")
def photos():
    items = []
    for image, mask in load_fixture():
        classes = sorted(int(c) for c in np.unique(mask) if c)
        items.append((image, mask, classes, blurry_cams(mask, classes)))
    sweep = ThresholdSweep(threshold_range(0.05, 0.6, 0.05), NUM_CLASSES)
    for image, mask, classes, cams in items:
        full = grid_to_image(cams, mask.shape, STRIDE)
        index = np.zeros((NUM_CLASSES - 1,) + mask.shape, np.float32)  # channels by class index - 1
        for k, c in enumerate(classes):
            index[c - 1] = full[k]
        sweep.update(index, mask, classes[0])
    best_threshold, cm = sweep.best()
    return items, best_threshold, cm


def test_fixture_cams_are_blurry(photos):
    _, best_threshold, cm = photos
    assert cm.miou() < 0.75  # the CAM alone is far from the objects' shapes


def test_seeds_are_more_precise_than_the_cam_and_cover_half_the_image(photos):
    items, best_threshold, cam_cm = photos
    crf = resolve_thresholds(dict(defaults()["crf"], mode="irnet", thresholds="cam_sweep", fg_ratio=1.5, bg_ratio=0.5),
                             best_threshold)
    cm = ConfusionMatrix(NUM_CLASSES)
    for image, mask, classes, cams in items:
        cm.update(seeds_for_image(image, cams, STRIDE, classes, crf), mask)
    s = cm.summary(["background", "a", "b"])
    assert s["pixel_accuracy"] > 100 * cam_cm.pixel_accuracy() + 2
    assert s["coverage"] >= 50
    assert cm.miou() > cam_cm.miou()


def test_random_walk_raises_the_miou_over_the_cam(photos):
    items, best_threshold, cam_cm = photos
    params = defaults()
    rw = resolve_background(dict(params["rw"], background="cam_sweep", beta=10.0, logt=6), best_threshold)
    offsets = pair_offsets(5)
    walked, plain = ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES)
    for image, mask, classes, cams in items:
        aff = colour_affinities(image, offsets)
        walked.update(pseudo_mask(image, cams, STRIDE, classes, rw, params["crf"], aff=aff, offsets=offsets,
                                  aff_stride=STRIDE), mask)
        plain.update(pseudo_mask(image, cams, STRIDE, classes, dict(rw, enabled=False), params["crf"]), mask)
    assert abs(plain.miou() - cam_cm.miou()) < 0.03  # without the walk: the CAM at its best threshold
    assert walked.miou() > plain.miou() + 0.05
