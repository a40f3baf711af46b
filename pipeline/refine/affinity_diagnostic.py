"""How well an affinity model separates classes, measured on GT pixel pairs (recorded by the
random_walk stage as ``affinity_separation`` in metrics/rw.json)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.refine.walk_affinity import cached_affinity_model, image_affinities

SEPARATION_IMAGES = 64  # images the diagnostic looks at (GT pairs: same class vs different)


def affinity_separation(model_path: str | Path, prepared, ids: Sequence[str], device: str = "cpu",
                        rw: dict | None = None) -> dict:
    """How well the AffinityNet separates classes, measured on GT: the mean predicted affinity of
    pixel pairs (cell centres of the affinity grid, within the training radius) whose GT classes are
    the same (background-background and object-object apart) and different. Images without GT are
    skipped. Returns {"images", "same_background", "same_object", "different", "gap"} (means, and
    same-object minus different: a walk can only separate objects when the gap is large). Without a
    background class, ``same_object`` is every same-class pair and ``same_background`` is None."""
    from pipeline.models.pairs import pair_labels, pair_offsets, seed_to_grid

    model = cached_affinity_model(model_path, device, rw)
    offsets = pair_offsets(model.radius)
    sums, counts, used = np.zeros(3), np.zeros(3), 0
    for image_id in ids:
        gt = prepared.gt(image_id)
        if gt is None:
            continue
        aff = image_affinities(model, prepared.image(image_id), offsets).cpu()
        grid = torch.from_numpy(seed_to_grid(gt, model.stride).astype(np.int64))[None]
        for k, mask in enumerate(pair_labels(grid, offsets, prepared.background)):
            sums[k] += float(aff[mask[0]].sum())
            counts[k] += int(mask.sum())
        used += 1
    means = [round(float(sv / c), 4) if c else None for sv, c in zip(sums, counts)]
    gap = round(means[1] - means[2], 4) if None not in (means[1], means[2]) else None
    return {"images": used, "same_background": means[0], "same_object": means[1], "different": means[2], "gap": gap}
