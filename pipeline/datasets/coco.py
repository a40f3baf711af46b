"""MS-COCO instances layout: one ``instances_*.json`` and one image folder per split.

Classes are the json's categories in ascending category-id order, mapped to contiguous
indices 1..K (0 = background); names come from the categories. Image ids are file-name stems.
Image-level labels are the categories of an image's annotations (crowd ones included).
GT masks are rasterised from the segmentations with pycocotools: non-crowd annotations in
file order (a later one paints over an earlier one), then crowd regions become 255 (ignore)
wherever no individual instance was painted. Images with no annotation at all are left out
by policy and reported in ``skipped`` (:class:`~pipeline.datasets.base.ExcludedItem`).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.datasets.base import Dataset, ExcludedItem, check_id
from pipeline.datasets.imageio import DatasetError
from pipeline.labels import IGNORE_INDEX
from pipeline.registry import DATASETS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class _Entry:
    """One image of a COCO json: where its file is and its annotations (class index, crowd, segmentation, ann id)."""

    file_name: str
    height: int
    width: int
    split: str
    anns: list[tuple[int, bool, object, object]] = field(default_factory=list)


@dataclass
class _Split:
    json_path: Path
    images_dir: Path
    categories: list[tuple[int, str]]  # (category id, name), ascending id
    entries: dict[str, _Entry]
    order: list[str]  # ids in json order, duplicates kept so scan can report them


def _require(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise DatasetError(f"{path}: {msg}")


def load_coco_split(split: str, json_path: str | Path, images_dir: str | Path) -> _Split:
    """Parse and validate one COCO instances json. Raises DatasetError naming the file."""
    path = Path(json_path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file is missing")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e
    _require(isinstance(data, dict), path, "not a COCO instances file (top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    _require(not missing, path, f"not a COCO instances file: missing list(s) {missing}")
    _require(len(data["categories"]) > 0, path, "'categories' is empty")

    cats: dict[int, str] = {}
    for k, c in enumerate(data["categories"]):
        _require(isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str), path,
                 f"categories[{k}] needs an integer 'id' and a string 'name', got {c!r}")
        _require(c["id"] not in cats, path, f"duplicate category id {c['id']}")
        cats[c["id"]] = c["name"].strip()
    categories = sorted(cats.items())
    names = [n for _, n in categories]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    _require(not dup_names, path, f"duplicate category names {dup_names}")
    _require("background" not in names, path, "a category is named 'background', which is reserved for index 0")
    cat_index = {cid: i + 1 for i, (cid, _) in enumerate(categories)}

    images_dir = Path(images_dir)
    by_coco_id: dict[object, _Entry] = {}
    entries: dict[str, _Entry] = {}
    order: list[str] = []
    for k, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str) \
            and isinstance(im.get("width"), int) and isinstance(im.get("height"), int)
        _require(ok, path, f"images[{k}] needs 'id', 'file_name', 'width' and 'height', got {im!r}")
        _require(im["id"] not in by_coco_id, path, f"duplicate image id {im['id']!r} in 'images'")
        stem = check_id(Path(im["file_name"]).stem, f"{path} (images[{k}] file_name {im['file_name']!r})")
        e = _Entry(im["file_name"], im["height"], im["width"], split)
        by_coco_id[im["id"]] = e
        entries.setdefault(stem, e)
        order.append(stem)

    for k, a in enumerate(data["annotations"]):
        _require(isinstance(a, dict) and "image_id" in a and "category_id" in a, path,
                 f"annotations[{k}] needs 'image_id' and 'category_id'")
        aid = a.get("id", k)
        if a["category_id"] not in cat_index:
            raise DatasetError(f"{path}: annotation {aid!r} references unknown category id {a['category_id']!r}; "
                               f"known ids: {sorted(cat_index)}")
        if a["image_id"] not in by_coco_id:
            raise DatasetError(f"{path}: annotation {aid!r} references unknown image id {a['image_id']!r}")
        by_coco_id[a["image_id"]].anns.append((cat_index[a["category_id"]], bool(a.get("iscrowd", 0)),
                                               a.get("segmentation"), aid))
    return _Split(path, images_dir, categories, entries, order)


def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    """(H, W) bool from a COCO segmentation: polygon list, uncompressed RLE or compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        polys = [list(map(float, p)) for p in seg if len(p) >= 6]
        if not polys:  # degenerate polygons cover no pixel
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"RLE size {seg['size']} != image size [{h}, {w}]")
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": [h, w], "counts": counts}
    else:
        raise ValueError(f"unsupported segmentation {type(seg).__name__}")
    return mask_utils.decode(rle).astype(bool)


@DATASETS.register("coco")
class CocoDataset(Dataset):
    name = "coco"

    @classmethod
    def from_params(cls, data: dict, prepared_dir: Path) -> "CocoDataset":
        root = Path(data["root"])
        return cls(root, splits={"train": (root / data["coco_train_json"], root / data["coco_train_images"]),
                                 "val": (root / data["coco_val_json"], root / data["coco_val_images"])})

    def __init__(self, root, splits: dict[str, tuple[str | Path, str | Path]]):
        super().__init__(root)
        if not splits:
            raise DatasetError(f"{self.root}: CocoDataset needs at least one split")
        self.split_files = {s: (Path(j), Path(d)) for s, (j, d) in splits.items()}
        self._loaded: dict[str, _Split] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        # workers (dask processes) only load pixels: ship neither the lock nor parsed jsons
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_loaded")}

    def __setstate__(self, state):
        self.__dict__.update(state, _loaded={}, _lock=threading.Lock())

    # --- lazy json loading (a COCO train json is ~0.5 GB: read only what is asked for) --------
    def _split(self, split: str) -> _Split:
        if split not in self.split_files:
            raise DatasetError(f"{self.root}: unknown split {split!r}; COCO splits: {sorted(self.split_files)}")
        with self._lock:
            if split not in self._loaded:
                sp = load_coco_split(split, *self.split_files[split])
                ref = next(iter(self._loaded.values()), None)
                if ref is not None and ref.categories != sp.categories:
                    raise DatasetError(f"{sp.json_path}: categories differ from those of {ref.json_path}; "
                                       "all splits must share one category list")
                self._loaded[split] = sp
            return self._loaded[split]

    @property
    def class_names(self) -> list[str]:
        first = "train" if "train" in self.split_files else next(iter(self.split_files))
        sp = next(iter(self._loaded.values()), None) or self._split(first)
        return ["background"] + [n for _, n in sp.categories]

    def _entry(self, image_id: str) -> _Entry:
        for sp in list(self._loaded.values()):
            if image_id in sp.entries:
                return sp.entries[image_id]
        for split in self.split_files:
            sp = self._split(split)
            if image_id in sp.entries:
                return sp.entries[image_id]
        raise DatasetError(f"{self.root}: image id {image_id!r} is in none of {[str(j) for j, _ in self.split_files.values()]}")

    # --- the adapter interface -----------------------------------------------------------------
    def split_ids(self, split: str) -> list[str]:
        return list(self._split(split).order)

    def image_path(self, image_id: str) -> Path:
        for sp in list(self._loaded.values()):
            if image_id in sp.entries:
                return sp.images_dir / sp.entries[image_id].file_name
        # later stages only load pixels: find the file without parsing a large json
        for _, images_dir in self.split_files.values():
            for ext in IMAGE_EXTS:
                p = images_dir / f"{image_id}{ext}"
                if p.is_file():
                    return p
        e = self._entry(image_id)
        return self.split_files[e.split][1] / e.file_name

    def describe(self, image_id: str) -> str:
        e = self._entry(image_id)
        return f"{self.split_files[e.split][0]} (image {e.file_name})"

    def gt_source(self, image_id: str) -> str:
        e = self._entry(image_id)
        return f"{self.split_files[e.split][0]} (annotations of {self.split_files[e.split][1] / e.file_name})"

    def raw_labels(self, image_id: str) -> list[int]:
        return sorted({cls for cls, _, _, _ in self._entry(image_id).anns})

    def load_gt(self, image_id: str) -> np.ndarray | None:
        """(H, W) uint8 from the json's segmentations; None when an annotation has none (bbox-only)."""
        e = self._entry(image_id)
        if any(seg is None for _, _, seg, _ in e.anns):
            return None
        h, w = e.height, e.width
        out = np.zeros((h, w), np.uint8)
        crowd = np.zeros((h, w), bool)
        for cls, iscrowd, seg, aid in e.anns:
            try:
                m = _segmentation_mask(seg, h, w)
            except (ValueError, TypeError, KeyError) as err:
                raise DatasetError(f"{self.gt_source(image_id)}: annotation {aid!r} has a bad segmentation: {err}") from err
            if iscrowd:
                crowd |= m
            else:
                out[m] = cls
        out[crowd & (out == 0)] = IGNORE_INDEX
        return out

    def check_item(self, image_id: str):
        if not self._entry(image_id).anns:
            raise ExcludedItem(f"{self.describe(image_id)}: no annotations (background-only image), left out")
        return super().check_item(image_id)
