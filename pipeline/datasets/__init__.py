"""Dataset adapters behind one interface (see :mod:`pipeline.datasets.base`)."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Dataset, Record, ScanResult, check_id
from pipeline.datasets.imageio import DatasetError
from pipeline.datasets.prepared import PreparedData


def open_dataset(data: dict, prepared_dir: str | Path = "data/prepared") -> Dataset:
    """The adapter named by ``data.dataset``; the demo lives inside the prepare stage's output."""
    kind = data["dataset"]
    if kind == "demo":
        from pipeline.datasets.demo import DemoDataset

        return DemoDataset(Path(prepared_dir) / "demo")
    if kind == "voc":
        from pipeline.datasets.voc import VOCDataset

        return VOCDataset(data["root"], use_sbd=data["voc_use_sbd"])
    if kind == "coco":
        from pipeline.datasets.coco import CocoDataset

        root = Path(data["root"])
        return CocoDataset(root, splits={
            "train": (root / data["coco_train_json"], root / data["coco_train_images"]),
            "val": (root / data["coco_val_json"], root / data["coco_val_images"]),
        })
    if kind == "folder":
        from pipeline.datasets.folder import FolderDataset

        root = Path(data["root"])
        return FolderDataset(root, csv=root / data["folder_csv"], classes=root / data["folder_classes"],
                             images=root / data["folder_images"], val_fraction=data["folder_val_fraction"])
    raise DatasetError(f"param data.dataset: unknown dataset {kind!r}")


__all__ = ["Dataset", "DatasetError", "PreparedData", "Record", "ScanResult", "check_id", "open_dataset"]
