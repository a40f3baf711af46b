"""The CAM gallery: per image, the image, its GT, the pseudo label at a threshold and one heatmap per labelled class."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from pipeline.cam.evaluate import pseudo_label
from pipeline.labels import grid_to_image
from pipeline.visual import colourise, grid, heatmap


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    out = image.copy()
    scale = max(0.3, min(out.shape[:2]) / 220)
    cv2.putText(out, text, (2, int(12 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(out, text, (2, int(12 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def cam_gallery(rows: Sequence[dict], class_names: Sequence[str], palette: np.ndarray, stride: int,
                threshold: float | None, cell: int = 160, first: int = 1) -> np.ndarray:
    """rows: {"id", "image" (H,W,3) uint8, "gt" (H,W) uint8 or None, "cam" (K, gh, gw), "labels" [class indices]}.
    ``first``: the first label class (1 after a background, 0 without one: CAM channel c - first is class c).

    Columns: image | GT | pseudo label @ threshold (argmax over the labels without background, threshold
    None) | heatmap of each labelled class (named on the cell)."""
    pictures, labels = [], []
    for r in rows:
        image, size = r["image"], r["image"].shape[:2]
        full = grid_to_image(np.asarray(r["cam"], np.float32), size, stride)
        gt = r["gt"] if r["gt"] is not None else np.full(size, 255, np.uint8)
        pseudo = pseudo_label(full, threshold, r["labels"], background=first == 1)
        row = [image, colourise(gt, palette), colourise(pseudo, palette)]
        for c in r["labels"]:
            row.append(_caption(heatmap(image, full[c - first]), class_names[c]))
        pictures.append(row)
        labels.append(r["id"])
    ncol = max((len(p) for p in pictures), default=3)
    pseudo_title = "pseudo (label argmax)" if threshold is None else f"pseudo @ {threshold:g}"
    titles = ["image", "ground truth", pseudo_title] + [f"CAM {i + 1}" for i in range(ncol - 3)]
    return grid(pictures, titles=titles, cell=cell, row_labels=labels)
