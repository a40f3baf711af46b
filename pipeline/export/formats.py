"""Writers and readers of the three export formats.

Every writer takes an iterator of ``(image_id, mask)`` pairs ((H, W) uint8; k class k (0 is the
background unless the dataset has none), 255 ignore) and a target folder that already exists, and returns the list of files
it wrote relative to that folder. Readers return ``{image_id: mask}`` so a round trip can be
checked against the source store.

- voc:  ``SegmentationClass/<id>.png`` palette PNGs, ``ImageSets/Segmentation/<split>.txt``,
        ``class_names.txt`` (line k = class k).
- coco: ``annotations/instances_<split>.json``: one annotation per class present per image,
        compressed-RLE segmentation, ``iscrowd`` 0, ``category_id`` = class index (background
        is category 0; without a background class, category 0 is the first class); pixels covered
        by no annotation are 255 (unsure).
- zarr: ``masks.zarr``: a copy of the mask store (zarr v3, array "mask", attrs hold ids).
- coco_instances: ``annotations/instances_<split>.json`` from the instance store
        (``data/instances.zarr``): one annotation per instance, compressed-RLE segmentation,
        ``category_id`` = class index, ``score`` in (0, 1], ``iscrowd`` 0; categories are the
        foreground classes (every class without background). Its reader returns instance-id maps
        (0 = no instance).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.coco import CocoError, instance_annotations, quiet_pycocotools, rle_regions
from pipeline.datasets.imageio import read_label_png, write_label_png
from pipeline.labels import IGNORE_INDEX, first_class
from pipeline.store import Store


class ExportError(ValueError):
    """An export cannot be written safely; the message names the id, file or param."""


def safe_member(root: Path, image_id: str, suffix: str) -> Path:
    """``root/<image_id><suffix>``, refusing ids that could name a file outside ``root``.

    Refused: non-strings, empty ids, ids containing ``/``, ``\\``, NUL or a line break (an id list
    holds one id per line), and ``.`` / ``..``; the final path is also resolved and must sit directly
    in ``root``.
    """
    if (not isinstance(image_id, str) or not image_id or any(c in image_id for c in "/\\\x00\n\r")
            or image_id in (".", "..")):
        raise ExportError(f"unsafe image id {image_id!r}: empty, or contains a path separator, a line break or '..'")
    path = root / f"{image_id}{suffix}"
    if path.resolve().parent != root.resolve():
        raise ExportError(f"unsafe image id {image_id!r}: would write outside {root}")
    return path


# --- VOC ------------------------------------------------------------------------------------

def write_voc(out: Path, items: Iterable[tuple[str, np.ndarray]], split: str, class_names: list[str],
              palette: np.ndarray, tick: Callable[[], None] = lambda: None) -> list[str]:
    masks_dir = out / "SegmentationClass"
    sets_dir = out / "ImageSets" / "Segmentation"
    masks_dir.mkdir(parents=True)
    sets_dir.mkdir(parents=True)
    ids = []
    for image_id, mask in items:
        write_label_png(safe_member(masks_dir, image_id, ".png"), mask, palette)
        ids.append(image_id)
        tick()
    (sets_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "class_names.txt").write_text("".join(f"{n}\n" for n in class_names))
    return ["SegmentationClass/", f"ImageSets/Segmentation/{split}.txt", "class_names.txt"]


def read_voc(folder: str | Path, split: str | None = None) -> dict[str, np.ndarray]:
    """{id: mask} of a VOC export (the split named in its manifest when ``split`` is None)."""
    folder = Path(folder)
    if split is None:
        split = json.loads((folder / "manifest.json").read_text())["split"]
    text = (folder / "ImageSets" / "Segmentation" / f"{split}.txt").read_text()
    ids = [line.removesuffix("\r") for line in text.split("\n") if line.removesuffix("\r")]  # spaces and tabs are
    # part of an id: only line breaks separate them
    return {i: read_label_png(safe_member(folder / "SegmentationClass", i, ".png")) for i in ids}


# --- COCO -----------------------------------------------------------------------------------

def mask_annotations(mask: np.ndarray, num_classes: int) -> list[dict]:
    """One COCO annotation dict per class present in ``mask`` (without id / image_id)."""
    present = [int(k) for k in np.unique(mask) if k != IGNORE_INDEX]
    if any(k >= num_classes for k in present):
        raise ExportError(f"mask has class {max(present)} but only {num_classes} classes are named")
    return [{"category_id": k, **region} for k, region in zip(present, rle_regions([mask == k for k in present]))]


def write_coco(out: Path, items: Iterable[tuple[str, np.ndarray]], split: str, class_names: list[str],
               file_name: Callable[[str], str], info: dict, tick: Callable[[], None] = lambda: None,
               background: bool = True) -> list[str]:
    images, annotations = [], []
    for n, (image_id, mask) in enumerate(items, start=1):
        safe_member(out, image_id, "")  # same id rules as the other formats
        h, w = mask.shape
        images.append({"id": n, "file_name": file_name(image_id), "height": int(h), "width": int(w),
                       "image_key": image_id})
        for ann in mask_annotations(mask, len(class_names)):
            annotations.append({"id": len(annotations) + 1, "image_id": n, **ann})
        tick()
    doc = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": name, "supercategory": "background" if background and k == 0 else "object"}
                       for k, name in enumerate(class_names)],
    }
    rel = f"annotations/instances_{split}.json"
    (out / "annotations").mkdir(parents=True)
    (out / rel).write_text(json.dumps(doc, separators=(",", ":")))
    return [rel]


def _decode_coco(path: str | Path, canvas: Callable[[int, int], np.ndarray],
                 value: Callable[[int, dict], int]) -> dict[str, np.ndarray]:
    """{image_key: map} of a COCO json (or an export folder): each annotation's mask painted with
    ``value(k, annotation)`` (k = 1.. in annotation order) on ``canvas(height, width)``."""
    from pycocotools.coco import COCO

    path = Path(path)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        path = path / manifest["files"]["annotations"]
    out = {}
    with quiet_pycocotools():
        coco = COCO(str(path))
        for img_id, img in coco.imgs.items():
            painted = canvas(img["height"], img["width"])
            for k, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=[img_id])), start=1):
                painted[coco.annToMask(ann).astype(bool)] = value(k, ann)
            out[img.get("image_key", img["file_name"])] = painted
    return out


def read_coco(path: str | Path) -> dict[str, np.ndarray]:
    """{image_key: mask} from a COCO export json (or its folder), decoded with pycocotools."""
    return _decode_coco(path, lambda h, w: np.full((h, w), IGNORE_INDEX, np.uint8), lambda k, ann: ann["category_id"])


# --- zarr -----------------------------------------------------------------------------------

def write_zarr(out: Path, store: Store, items: Iterator[tuple[str, np.ndarray]],
               tick: Callable[[], None] = lambda: None) -> list[str]:
    """Copy the store's files; ``items`` is consumed only to validate every mask and count progress."""
    for image_id, _ in items:
        safe_member(out, image_id, "")
        tick()
    shutil.copytree(store.path, out / "masks.zarr")
    return ["masks.zarr/"]


def read_zarr(folder: str | Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    store = Store(folder / "masks.zarr")
    return {i: store.read("mask", i) for i in store.ids}


# --- COCO instances ---------------------------------------------------------------------------

def write_coco_instances(out: Path, items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]], split: str,
                         class_names: list[str], file_name: Callable[[str], str], info: dict,
                         tick: Callable[[], None] = lambda: None, background: bool = True) -> list[str]:
    """``items``: (image_id, instance, mask, score) per image (the instance store's arrays)."""
    images, annotations = [], []
    for n, (image_id, instance, mask, score) in enumerate(items, start=1):
        safe_member(out, image_id, "")
        h, w = instance.shape
        images.append({"id": n, "file_name": file_name(image_id), "height": int(h), "width": int(w),
                       "image_key": image_id})
        try:
            try:
                anns = instance_annotations(instance, mask, score, len(class_names), first_class(background))
            except CocoError as e:
                raise ExportError(f"{image_id}: {e}") from None
        except ExportError as e:
            raise ExportError(f"image {image_id!r}: {e}") from None
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": n, **ann})
        tick()
    doc = {"info": info, "licenses": [], "images": images, "annotations": annotations,
           "categories": [{"id": k, "name": name, "supercategory": "object"}
                          for k, name in enumerate(class_names) if k >= first_class(background)]}
    rel = f"annotations/instances_{split}.json"
    (out / "annotations").mkdir(parents=True)
    (out / rel).write_text(json.dumps(doc, separators=(",", ":")))
    return [rel]


def read_coco_instances(path: str | Path) -> dict[str, np.ndarray]:
    """{image_key: (H, W) uint16 instance map} (annotation order, 1..n; 0 = no instance) of a
    coco_instances export json (or its folder), decoded with pycocotools."""
    return _decode_coco(path, lambda h, w: np.zeros((h, w), np.uint16), lambda k, ann: k)


READERS = {"voc": read_voc, "coco": read_coco, "zarr": read_zarr, "coco_instances": read_coco_instances}


@dataclass
class ExportJob:
    """What every format writer is given: the masks (a fresh, validating iterator per call), the
    instance store's items for ``coco_instances``, and the dataset facts the formats record."""

    masks: Callable[[], Iterator[tuple[str, np.ndarray]]]
    store: Store
    split: str
    class_names: list[str]
    palette: np.ndarray
    file_name: Callable[[str], str]  # image id -> the image's file name (COCO file_name)
    dataset_name: str | None
    created: str
    instances: Callable[[], Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]] | None = None
    background: bool = True  # class 0 is the background (False: a dataset without one)

    def coco_info(self, what: str) -> dict:
        return {"description": f"{what} of {self.dataset_name}/{self.split}", "version": "1",
                "date_created": self.created}


def _voc(job: ExportJob, folder: Path, tick: Callable[[], None]) -> dict:
    written = write_voc(folder, job.masks(), job.split, job.class_names, job.palette, tick)
    return {"masks": "SegmentationClass/<id>.png", "ids": written[1], "class_names": written[2]}


def _coco(job: ExportJob, folder: Path, tick: Callable[[], None]) -> dict:
    written = write_coco(folder, job.masks(), job.split, job.class_names, job.file_name, job.coco_info("pseudo masks"),
                         tick, job.background)
    return {"annotations": written[0]}


def _coco_instances(job: ExportJob, folder: Path, tick: Callable[[], None]) -> dict:
    written = write_coco_instances(folder, job.instances(), job.split, job.class_names, job.file_name,
                                   job.coco_info("instance pseudo masks"), tick, job.background)
    return {"annotations": written[0]}


def _zarr(job: ExportJob, folder: Path, tick: Callable[[], None]) -> dict:
    write_zarr(folder, job.store, job.masks(), tick)
    return {"store": "masks.zarr"}


# format -> writer(job, folder, tick) -> the manifest's "files" entry; beside READERS, one row per format
WRITERS: dict[str, Callable[[ExportJob, Path, Callable[[], None]], dict]] = {
    "voc": _voc, "coco": _coco, "zarr": _zarr, "coco_instances": _coco_instances}
FORMATS = tuple(WRITERS)
# what each format writes at the top of its folder (beside manifest.json and README.md)
FORMAT_ENTRIES = {"voc": {"SegmentationClass", "ImageSets", "class_names.txt"}, "coco": {"annotations"},
                  "zarr": {"masks.zarr"}, "coco_instances": {"annotations"}}

