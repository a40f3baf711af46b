"""COCO helpers shared by the export (``coco``, ``coco_instances``) and the instance stage's COCO
mask AP: masks to compressed-RLE annotations with pycocotools."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np


class CocoError(ValueError):
    """An instance map and class mask that cannot make COCO annotations (the message says why)."""


def rle_regions(regions: list[np.ndarray]) -> list[dict]:
    """Binary (H, W) masks -> COCO {"segmentation" (compressed RLE), "area", "bbox", "iscrowd": 0} each."""
    from pycocotools import mask as mask_utils

    if not regions:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.stack(regions, axis=2).astype(np.uint8)))
    return [{"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
             "area": float(area), "bbox": [float(v) for v in box], "iscrowd": 0}
            for rle, area, box in zip(rles, mask_utils.area(rles), mask_utils.toBbox(rles))]


@contextlib.contextmanager
def quiet_pycocotools():
    """pycocotools prints progress, and warns on every decode under numpy 2: not ours to fix."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        yield


def instance_annotations(instance: np.ndarray, mask: np.ndarray, score: np.ndarray, num_classes: int,
                         first: int = 1) -> list[dict]:
    """One COCO annotation dict per instance of an instance-store image (without id / image_id).
    ``first``: the first class an instance may have (1 after a background class, 0 without one)."""
    ids = [int(k) for k in np.unique(instance) if k != 0]
    regions = [instance == k for k in ids]
    out = []
    for k, pixels, region in zip(ids, regions, rle_regions(regions)):
        classes = np.unique(mask[pixels])
        if len(classes) != 1 or not first <= int(classes[0]) < num_classes:
            raise CocoError(f"instance {k} has class values {classes.tolist()}; expected one class in "
                            f"{first}..{num_classes - 1}")
        out.append({"category_id": int(classes[0]), **region, "score": round(float(score[pixels].max()), 5)})
    return out
