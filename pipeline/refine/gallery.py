"""Galleries of the refiners' outputs: fixed images in rows, one column per label map."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.labels import IGNORE_INDEX, class_channels, grid_to_image, label_scores, present_classes, to_class_labels
from pipeline.visual import colourise, grid, heatmap


def _cam_columns(prepared, cams, image_id: str, alpha: float):
    image = prepared.image(image_id)
    classes = present_classes(prepared.labels(image_id))
    cam = cams.read("cam", image_id)[class_channels(classes, prepared.background)].astype(np.float32)
    full = grid_to_image(cam, image.shape[:2], int(cams.specs["cam"].stride))
    cam_max = full.max(0) if len(full) else np.zeros(image.shape[:2], np.float32)
    cam_label = to_class_labels(label_scores(full, alpha, prepared.background).argmax(0), classes, prepared.background)
    return image, cam_max, cam_label


def refine_gallery(prepared, ids: Sequence[str], cams, columns: dict, alpha: float | None, cell: int = 128) -> np.ndarray:
    """Rows = ``ids``; columns: image, GT, CAM heatmap, CAM argmax (background (1 - max)^alpha; over the
    image's labels only without a background class), then one column per entry of ``columns``
    ({title: Store with array "seed" or "mask"})."""
    pal = prepared.palette
    rows = []
    for image_id in ids:
        image, cam_max, cam_label = _cam_columns(prepared, cams, image_id, alpha)
        gt = prepared.gt(image_id)
        gt = gt if gt is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        row = [image, colourise(gt, pal), heatmap(image, cam_max), colourise(cam_label, pal)]
        for store in columns.values():
            name = "seed" if "seed" in store.specs else "mask"
            row.append(colourise(store.read(name, image_id), pal))
        rows.append(row)
    argmax_title = f"CAM argmax a={alpha:g}" if prepared.background else "CAM argmax (labels)"
    titles = ["image", "ground truth", "CAM max", argmax_title] + list(columns)
    return grid(rows, titles=titles, cell=cell, row_labels=list(ids))


def instance_gallery(prepared, ids: Sequence[str], instances, cell: int = 128) -> np.ndarray:
    """Rows = ``ids``; columns: image, GT, the instances' classes, each instance in its own colour
    over the image, and the instance scores."""
    from pipeline.datasets.imageio import voc_palette
    from pipeline.visual import overlay

    pal = prepared.palette
    rows = []
    for image_id in ids:
        image = prepared.image(image_id)
        gt = prepared.gt(image_id)
        gt = gt if gt is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        inst = instances.read("instance", image_id)
        colours = voc_palette(int(inst.max()) + 1)  # 0 (no instance) black, then one colour per instance
        rows.append([image, colourise(gt, pal), colourise(instances.read("mask", image_id), pal),
                     overlay(image, inst, colours, alpha=0.7), heatmap(image, instances.read("score", image_id))])
    return grid(rows, titles=["image", "ground truth", "instance classes", "instances", "instance score"], cell=cell,
                row_labels=list(ids))
