"""PASCAL VOC 2012 layout (optionally with SBD's SegmentationClassAug and train_aug list).

root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png (palette, 255 = ignore),
root/ImageSets/Segmentation/<split>.txt, root/Annotations/<id>.xml (labels when no mask).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

from pipeline.datasets.base import Dataset, check_id
from pipeline.datasets.imageio import DatasetError, read_label_png
from pipeline.registry import DATASETS

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@DATASETS.register("voc")
class VOCDataset(Dataset):
    name = "voc"

    @classmethod
    def from_params(cls, data: dict, prepared_dir: Path) -> "VOCDataset":
        return cls(data["root"], use_sbd=data["voc_use_sbd"])

    def __init__(self, root, use_sbd: bool = False, class_names: list[str] | None = None):
        super().__init__(root)
        self.use_sbd = use_sbd
        self._classes = list(class_names or VOC_CLASSES)
        self.mask_dir = self.root / ("SegmentationClassAug" if use_sbd and (self.root / "SegmentationClassAug").is_dir()
                                     else "SegmentationClass")

    @property
    def class_names(self) -> list[str]:
        return self._classes

    def split_file(self, split: str) -> Path:
        name = "train_aug" if split == "train" and self.use_sbd else split
        for cand in (self.root / "ImageSets" / "Segmentation" / f"{name}.txt", self.root / "ImageSets" / f"{name}.txt"):
            if cand.is_file():
                return cand
        raise DatasetError(f"{self.root / 'ImageSets' / 'Segmentation' / (name + '.txt')}: split list is missing")

    def split_ids(self, split: str) -> list[str]:
        f = self.split_file(split)
        ids = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
        # DeepLab's train_aug.txt lists "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" pairs
        ids = [PurePosixPath(i).stem if "/" in i and PurePosixPath(i).suffix else i for i in ids]
        return [check_id(i, str(f)) for i in ids]

    def image_path(self, image_id: str) -> Path:
        jpg = self.root / "JPEGImages" / f"{image_id}.jpg"
        if jpg.is_file():
            return jpg
        png = jpg.with_suffix(".png")
        return png if png.is_file() else jpg

    def gt_path(self, image_id: str) -> Path | None:
        p = self.mask_dir / f"{image_id}.png"
        return p if p.is_file() else None

    def instance_gt_path(self, image_id: str) -> Path | None:
        p = self.root / "SegmentationObject" / f"{image_id}.png"
        return p if p.is_file() else None

    def raw_labels(self, image_id: str):
        gt_file = self.gt_path(image_id)
        if gt_file is not None:
            import numpy as np

            values = np.unique(read_label_png(gt_file))
            return [int(v) for v in values if 0 < v < 255]
        xml = self.root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DatasetError(f"{xml}: no mask and no annotation file, so the image has no labels")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise DatasetError(f"{xml}: cannot parse annotation XML: {e}") from e
        return [(o.findtext("name") or "").strip() for o in tree.getroot().iter("object")]
