"""Label conventions every stage shares: the ignore value, class indices, the background channel,
and stride-grid maps brought to image size.

Class indices: ``k`` = ``class_names[k]``, :data:`IGNORE_INDEX` (255) = unknown / unsure / not
labelled. A dataset *with background* (``data.background: true``, the default) has
``class_names[0] == "background"``: image labels are 1..C-1, per-class maps have ``C-1`` channels
(channel ``k-1`` is class ``k``) and the refinement adds a background channel. A dataset *without
background* (scenes where every pixel is a class): image labels are 0..C-1, per-class maps have ``C``
channels (channel ``k`` is class ``k``) and no stage adds a background channel: a pixel is one of
its image's labels. :func:`first_class` is the one place that offset lives. A map "on a stride-s
grid" has shape ``(K, ceil(H/s), ceil(W/s))`` for an H x W image.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

IGNORE_INDEX = 255


def first_class(background: bool) -> int:
    """The index of the first labellable class: 1 after the background, 0 without one. Class ``k``'s
    channel in a per-class map is ``k - first_class(background)``."""
    return 1 if background else 0


def present_classes(labels: Sequence[int]) -> list[int]:
    """Sorted, unique class indices of an image's labels."""
    return sorted({int(c) for c in labels})


def class_channels(classes: Sequence[int], background: bool = True) -> list[int]:
    """The per-class map channels of ``classes``."""
    first = first_class(background)
    return [int(c) - first for c in classes]


def label_scores(cams: np.ndarray, alpha: float, background: bool = True) -> np.ndarray:
    """The scores a pixel's label is the argmax of: with background, :func:`with_background`;
    without, the image's class maps as they are (a pixel is one of its labels)."""
    return with_background(cams, alpha) if background else np.asarray(cams, np.float32)


def with_background(cams: np.ndarray, alpha: float) -> np.ndarray:
    """(K, h, w) foreground scores -> (1 + K, h, w) with channel 0 = (1 - max_k cam)^alpha."""
    fg_max = cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
    bg = np.power(np.clip(1.0 - fg_max, 0.0, 1.0), alpha).astype(np.float32)
    return np.concatenate([bg[None], cams.astype(np.float32)], 0)


def to_class_labels(index: np.ndarray, classes: Sequence[int], background: bool = True) -> np.ndarray:
    """Index map into :func:`label_scores`' channels -> uint8 class labels (255 kept). With
    background: 0 = background, k = classes[k-1]; without: k = classes[k]."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    if background:
        lut[0] = 0
    for k, c in enumerate(classes, start=first_class(background)):
        lut[k] = c
    return lut[np.asarray(index).astype(np.int64).clip(0, 255)]


def resize_maps(maps: np.ndarray, size: Sequence[int], interp=cv2.INTER_LINEAR) -> np.ndarray:
    """(K, h, w) float -> (K, H, W) float32 (cv2 resize, up to 256 channels per call)."""
    h, w = int(size[0]), int(size[1])
    maps = np.asarray(maps, np.float32)
    k = maps.shape[0]
    if k == 0:
        return np.zeros((0, h, w), np.float32)
    if maps.shape[1:] == (h, w):
        return maps.copy()
    out = np.empty((k, h, w), np.float32)
    for lo in range(0, k, 256):  # cv2 handles at most 512 channels per call
        part = cv2.resize(np.ascontiguousarray(maps[lo:lo + 256].transpose(1, 2, 0)), (w, h), interpolation=interp)
        out[lo:lo + 256] = part.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def grid_to_image(maps: np.ndarray, size: Sequence[int], stride: int) -> np.ndarray:
    """Maps on a stride grid (K, ceil(H/s), ceil(W/s)) -> (K, H, W) float32, bilinear.

    Grid cell j covers pixels [j*s, (j+1)*s) (centred at (j + 0.5)*s): resize to the padded canvas,
    then crop, so the geometry is exact whatever H mod s is.
    """
    h, w = int(size[0]), int(size[1])
    gh, gw = maps.shape[-2:]
    return resize_maps(maps, (gh * stride, gw * stride))[:, :h, :w]
