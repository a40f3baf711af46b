"""Image/target augmentation and normalisation shared by the training stages."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from pipeline.labels import IGNORE_INDEX

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalise(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ImageNet-normalised."""
    return torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())


def random_scale_crop_flip(rng: np.random.Generator, image: np.ndarray, masks: list[np.ndarray], crop: int,
                           scale_min: float, scale_max: float, mask_fill: int = IGNORE_INDEX):
    """Rescale by U(scale_min, scale_max), random crop ``crop``x``crop`` (padding: image 0 after
    normalisation = mean colour, masks ``mask_fill``), random horizontal flip.

    image: (H, W, 3) uint8; masks: (H, W) uint8 label maps aligned with the image (nearest resampling).
    Returns (image (crop, crop, 3) uint8, [masks (crop, crop) uint8], valid (crop, crop) bool).
    """
    h, w = image.shape[:2]
    s = rng.uniform(scale_min, scale_max)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    masks = [cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST) for m in masks]
    ph, pw = max(crop, nh), max(crop, nw)
    canvas = np.empty((ph, pw, 3), np.uint8)
    canvas[:] = MEAN.round().astype(np.uint8)
    valid = np.zeros((ph, pw), bool)
    oy, ox = rng.integers(0, ph - nh + 1), rng.integers(0, pw - nw + 1)
    canvas[oy:oy + nh, ox:ox + nw] = image
    valid[oy:oy + nh, ox:ox + nw] = True
    mcanvas = []
    for m in masks:
        c = np.full((ph, pw), mask_fill, np.uint8)
        c[oy:oy + nh, ox:ox + nw] = m
        mcanvas.append(c)
    y, x = rng.integers(0, ph - crop + 1), rng.integers(0, pw - crop + 1)
    sl = (slice(y, y + crop), slice(x, x + crop))
    image, valid, masks = canvas[sl], valid[sl], [m[sl] for m in mcanvas]
    if rng.random() < 0.5:
        image, valid, masks = image[:, ::-1], valid[:, ::-1], [m[:, ::-1] for m in masks]
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks], np.ascontiguousarray(valid)
