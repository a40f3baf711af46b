"""Reading the instance store (``data/instances.zarr``: per image an instance-id map, its class mask and
per-pixel scores), for the instance stage's metrics and the ``coco_instances`` export."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.store import Store


def instance_items(store: Store) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(image_id, instance, mask, score) for every image of an instance store."""
    masks, scores = store.iter("mask"), store.iter("score")
    for (i, inst), (_, mask), (_, score) in zip(store.iter("instance"), masks, scores):
        yield store.ids[i], inst, mask, score
