"""The one dataset interface every adapter implements.

Conventions (all adapters):
- ``background`` True (the default): ``class_names[0] == "background"``, image labels are 1..C-1;
  False (scenes where every pixel is a class): no background index, image labels are 0..C-1
  (:mod:`pipeline.labels`). Ground-truth masks hold class indices, 255 = ignore.
- ``labels(id)`` is the image-level label set as class indices.
- ``load_image(id)`` returns (H, W, 3) uint8 RGB whatever the file's mode.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.imageio import DatasetError, exif_orientation, read_label_png, read_rgb, voc_palette
from pipeline.labels import IGNORE_INDEX, first_class


class ExcludedItem(DatasetError):
    """An image the adapter leaves out by policy (e.g. a COCO image with no annotations).

    ``scan`` always reports it in ``skipped``, even with ``on_bad_item="fail"``: it is not bad input.
    """


@dataclass
class Record:
    """One validated image: what the prepare stage writes into the index."""

    id: str
    size: tuple[int, int]
    labels: list[int]
    has_gt: bool


@dataclass
class ScanResult:
    records: list[Record] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class Dataset(ABC):
    """Adapter interface: ids per split, image loader, image-level labels, optional GT masks."""

    name: str = "dataset"
    background: bool = True  # class 0 is "background" (False: every class can be an image label)

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root folder does not exist (param data.root)")

    # --- what an adapter provides -------------------------------------------------
    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    @abstractmethod
    def split_ids(self, split: str) -> list[str]:
        """Image ids of a split, in a stable order."""

    @abstractmethod
    def image_path(self, image_id: str) -> Path: ...

    @abstractmethod
    def raw_labels(self, image_id: str) -> list[str] | list[int]:
        """Image-level labels as class names or foreground class indices."""

    def gt_path(self, image_id: str) -> Path | None:
        return None

    def describe(self, image_id: str) -> str:
        """Where an image's entry comes from, for error messages (default: its file)."""
        return str(self.image_path(image_id))

    def gt_source(self, image_id: str) -> str:
        """Where an image's GT comes from, for error messages (default: its mask file)."""
        return str(self.gt_path(image_id))

    def load_gt(self, image_id: str) -> np.ndarray | None:
        """(H, W) uint8 class indices with 255 = ignore, or None when the image has no GT."""
        p = self.gt_path(image_id)
        return None if p is None or not p.is_file() else read_label_png(p)

    def instance_gt_path(self, image_id: str) -> Path | None:
        """The image's instance mask file (VOC's SegmentationObject), or None."""
        return None

    def load_instance_gt(self, image_id: str, size: tuple[int, int]) -> np.ndarray | None:
        """(H, W) uint8 instance ids (0 background, 1..n objects, 255 void), or None when there is no
        instance mask. Used only to score instance pseudo masks."""
        p = self.instance_gt_path(image_id)
        if p is None or not p.is_file():
            return None
        m = read_label_png(p)
        if m.shape != tuple(size):
            raise DatasetError(f"{p}: instance mask size {m.shape[1]}x{m.shape[0]} != image size {size[1]}x{size[0]}")
        return m

    # --- shared behaviour -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> np.ndarray:
        """A colour per class: VOC's, with black for the background; without a background every class
        takes a colour (class k gets VOC's colour k + 1, so no class is drawn black)."""
        first = 0 if self.background else 1
        return voc_palette(256)[first: first + self.num_classes]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def labels(self, image_id: str) -> list[int]:
        """Sorted foreground class indices; unknown names raise DatasetError naming the image."""
        out = set()
        first = first_class(self.background)
        index = {n: i for i, n in enumerate(self.class_names)}
        for lab in self.raw_labels(image_id):
            if isinstance(lab, str):
                if lab not in index or index[lab] < first:
                    raise DatasetError(f"{self.describe(image_id)}: unknown class name {lab!r}; known: "
                                       f"{self.class_names[first:]}")
                lab = index[lab]
            if not first <= int(lab) < self.num_classes:
                raise DatasetError(f"{self.describe(image_id)}: class index {lab} out of range {first}..{self.num_classes - 1}")
            out.add(int(lab))
        return sorted(out)

    def check_item(self, image_id: str) -> Record:
        """Validate one image fully (decode, labels, GT size and values). Raises DatasetError."""
        img = self.load_image(image_id)
        size = (int(img.shape[0]), int(img.shape[1]))
        gt = self.load_gt(image_id)
        if gt is not None:
            if gt.shape != size:
                raise DatasetError(self._size_mismatch(image_id, gt.shape, size))
            bad = np.setdiff1d(np.unique(gt), np.r_[np.arange(self.num_classes), IGNORE_INDEX])
            if bad.size:
                raise DatasetError(f"{self.gt_source(image_id)}: mask has values {bad.tolist()} outside 0..{self.num_classes - 1} and 255")
        labels = self.labels(image_id)
        if not labels:
            raise DatasetError(f"{self.describe(image_id)}: image has no labels")
        return Record(image_id, size, labels, gt is not None)

    def _size_mismatch(self, image_id: str, mask: tuple[int, int], size: tuple[int, int]) -> str:
        """Why a mask does not fit its image, naming both files (and the EXIF orientation when it turns the image)."""
        path = self.image_path(image_id)
        msg = (f"{self.gt_source(image_id)}: mask size {mask[1]}x{mask[0]} != image size {size[1]}x{size[0]} "
               f"(width x height as displayed) of {path}")
        try:
            with Image.open(path) as im:
                orientation = exif_orientation(im)
        except Exception:
            orientation = 1
        if orientation != 1:
            msg += (f"; the image's EXIF orientation {orientation} turns it when displayed (stored "
                    f"{size[1] if orientation < 5 else size[0]}x{size[0] if orientation < 5 else size[1]}), and masks "
                    f"must match the displayed image")
        return msg

    def scan(self, split: str, on_bad_item: str = "fail", max_images: int = 0, progress: bool = True) -> ScanResult:
        """Validate every image of a split once. ``on_bad_item``: ``fail`` raises, ``skip`` reports."""
        from pipeline.progress import progress_bar

        ids = self.split_ids(split)
        if max_images:
            ids = ids[:max_images]
        seen: set[str] = set()
        res = ScanResult()
        with progress_bar(total=len(ids), desc=f"scan {self.name}/{split}", unit="img", disable=not progress) as bar:
            for image_id in ids:
                bar.update(1)
                try:
                    if image_id in seen:
                        raise DatasetError(f"{self.describe(image_id)}: duplicate image id {image_id!r} in split {split!r}")
                    seen.add(image_id)
                    res.records.append(self.check_item(image_id))
                except DatasetError as e:
                    if on_bad_item == "fail" and not isinstance(e, ExcludedItem):
                        raise
                    res.skipped.append({"id": image_id, "split": split, "reason": str(e)})
        if not res.records:
            raise DatasetError(f"{self.root}: split {split!r} has no usable images")
        return res


def check_id(image_id: str, source: str) -> str:
    """Ids name files and fill one-id-per-line lists: refuse empty ids, path separators, '..', NUL and
    line breaks, so no id can escape a folder or split into two list entries."""
    if (not image_id or "/" in image_id or "\\" in image_id or image_id in (".", "..")
            or any(c in image_id for c in "\x00\n\r")):
        raise DatasetError(f"{source}: unsafe image id {image_id!r} (empty, or contains a path separator, a line "
                           f"break or '..')")
    return image_id
