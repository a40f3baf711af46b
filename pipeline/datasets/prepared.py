"""The validated view of a dataset that the prepare stage writes and every later stage reads.

``<prepared>/index.json``: dataset name, class names, palette, ids per split, per-image size and
labels, skipped items. ``<prepared>/gt.zarr``: ground-truth masks (255 where an image has none).
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.datasets.imageio import DatasetError
from pipeline.labels import IGNORE_INDEX, first_class


def as_prepared(prepared: "PreparedData | str | Path", data: dict) -> "PreparedData":
    """The prepared data a stage's library call was given: an open PreparedData, or its folder."""
    return prepared if isinstance(prepared, PreparedData) else PreparedData(data, prepared)


def prepared_folder(prepared: "PreparedData | str | Path") -> Path:
    """The folder of the prepared data a stage's library call was given (an open PreparedData or a path)."""
    return prepared.dir if isinstance(prepared, PreparedData) else Path(prepared)


class PreparedData:
    def __init__(self, data_params: dict, prepared_dir: str | Path = "data/prepared"):
        self.dir = Path(prepared_dir)
        index_file = self.dir / "index.json"
        if not index_file.is_file():
            raise DatasetError(f"{index_file}: missing; run the prepare stage first (dvc repro prepare)")
        self.index = json.loads(index_file.read_text())
        self.data_params = data_params
        self.class_names: list[str] = self.index["class_names"]
        # True when class 0 is the background (indexes from before data.background were all made with one)
        self.background: bool = bool(self.index.get("background", True))
        self.first_class: int = first_class(self.background)
        if "background" in data_params and bool(data_params["background"]) != self.background:
            raise DatasetError(f"param data.background: {str(data_params['background']).lower()}, but {index_file} was "
                               f"prepared with background {str(self.background).lower()}; re-run the prepare stage")
        self.palette = np.asarray(self.index["palette"], dtype=np.uint8)
        self._items = self.index["items"]

    @cached_property
    def dataset(self):
        from pipeline.datasets.open import open_dataset

        return open_dataset(self.data_params, self.dir)

    @cached_property
    def gt_store(self):
        from pipeline.store import Store

        return Store(self.dir / "gt.zarr")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_label_classes(self) -> int:
        """How many classes can be image labels (the classifier's outputs, the CAM channels)."""
        return self.num_classes - self.first_class

    @property
    def label_class_names(self) -> list[str]:
        """The names of the classes that can be image labels, in channel order."""
        return self.class_names[self.first_class:]

    def _item(self, image_id: str) -> dict:
        try:
            return self._items[image_id]
        except KeyError:
            raise DatasetError(f"image {image_id!r} is not in the prepared dataset {self.dir} ({len(self._items)} "
                               "images): a store that names it was made from other data; re-run the stage that "
                               "made it (dvc repro)") from None

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._items

    def ids(self, split: str) -> list[str]:
        if split not in self.index["splits"]:
            raise DatasetError(f"split {split!r} was not prepared; prepared splits: {sorted(self.index['splits'])}")
        return list(self.index["splits"][split])

    def size(self, image_id: str) -> tuple[int, int]:
        return tuple(self._item(image_id)["size"])

    def sizes(self, ids) -> np.ndarray:
        return np.array([self._item(i)["size"] for i in ids], dtype=np.int32).reshape(-1, 2)

    def labels(self, image_id: str) -> list[int]:
        """Class indices of the image's labels (1..C-1 with background, 0..C-1 without)."""
        return list(self._item(image_id)["labels"])

    def label_vector(self, image_id: str) -> np.ndarray:
        """Multi-hot over the label classes: (num_label_classes,) float32, entry k - first_class for class k."""
        v = np.zeros(self.num_label_classes, np.float32)
        v[np.asarray(self.labels(image_id), int) - self.first_class] = 1
        return v

    def has_gt(self, image_id: str) -> bool:
        return bool(self._item(image_id)["has_gt"])

    def image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return self.dataset.load_image(image_id)

    def instance_gt(self, image_id: str) -> np.ndarray | None:
        """(H, W) uint8 instance GT (0 background, 1..n objects, 255 void) or None (no instance mask,
        or a prepared folder from before instance GT was kept). For evaluation only."""
        if not self.has_gt(image_id) or "instance" not in self.gt_store.specs:
            return None
        m = self.gt_store.read("instance", image_id)
        return None if (m == IGNORE_INDEX).all() else m

    def gt(self, image_id: str) -> np.ndarray | None:
        """(H, W) uint8 GT (255 = ignore) or None. For evaluation only."""
        return self.gt_store.read("mask", image_id) if self.has_gt(image_id) else None
