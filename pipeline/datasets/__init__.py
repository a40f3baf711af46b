"""Dataset adapters behind one interface (see :mod:`pipeline.datasets.base`), registered in
``pipeline.registry.DATASETS`` and picked by ``data.dataset``.

Importing this package registers the built-ins ``demo``, ``voc``, ``coco`` and ``folder``. A plugin
adds a :class:`Dataset` subclass the same way as a CAM method (``@DATASETS.register``, an entry point
``dataset.<name>`` in group ``wsss.plugins``, or a dotted path in ``data.dataset``); it is built with
its classmethod ``from_params(data, prepared_dir)`` when it has one, else as ``cls(data["root"])``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.datasets.base import Dataset, Record, ScanResult, check_id
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.demo import DemoDataset
from pipeline.datasets.folder import FolderDataset
from pipeline.datasets.imageio import DatasetError
from pipeline.datasets.prepared import PreparedData
from pipeline.datasets.voc import VOCDataset
from pipeline.registry import DATASETS, RegistryError


def _demo(data: dict, prepared_dir: Path) -> Dataset:
    return DemoDataset(prepared_dir / "demo")  # the demo lives inside the prepare stage's output


def _voc(data: dict, prepared_dir: Path) -> Dataset:
    return VOCDataset(data["root"], use_sbd=data["voc_use_sbd"])


def _coco(data: dict, prepared_dir: Path) -> Dataset:
    root = Path(data["root"])
    return CocoDataset(root, splits={
        "train": (root / data["coco_train_json"], root / data["coco_train_images"]),
        "val": (root / data["coco_val_json"], root / data["coco_val_images"]),
    })


def _folder(data: dict, prepared_dir: Path) -> Dataset:
    root = Path(data["root"])
    return FolderDataset(root, csv=root / data["folder_csv"], classes=root / data["folder_classes"],
                         images=root / data["folder_images"], val_fraction=data["folder_val_fraction"])


# how each built-in adapter reads its ``data`` params
_BUILTIN_FROM_PARAMS: dict[type, Callable[[dict, Path], Dataset]] = {
    DemoDataset: _demo, VOCDataset: _voc, CocoDataset: _coco, FolderDataset: _folder}


def dataset_class(name: str) -> type[Dataset]:
    """The Dataset subclass registered, advertised or importable as ``name`` (param ``data.dataset``).
    Raises DatasetError naming the param when there is none (or the plugin fails to load)."""
    try:
        cls = DATASETS.get(name)
    except RegistryError as e:
        raise DatasetError(str(e)) from (e.__cause__ or e)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise DatasetError(f"param data.dataset: {name!r} resolves to {cls!r}, which is not a Dataset subclass")
    return cls


def open_dataset(data: dict, prepared_dir: str | Path = "data/prepared") -> Dataset:
    """The adapter named by ``data.dataset``, built from the ``data`` params."""
    cls = dataset_class(data["dataset"])
    build = _BUILTIN_FROM_PARAMS.get(cls) or getattr(cls, "from_params", None)
    return build(data, Path(prepared_dir)) if build is not None else cls(data["root"])


__all__ = ["Dataset", "DatasetError", "PreparedData", "Record", "ScanResult", "check_id", "dataset_class",
           "open_dataset"]
