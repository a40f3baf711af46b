"""A plain folder of images with a labels CSV: the easiest way to bring your own data.

Layout (paths are params, relative to ``data.root``)::

    root/classes.txt      one class name per line ("background" is implied at index 0 unless listed first;
                          with ``data.background: false`` there is no background: the first line is
                          class 0 and a "background" line is refused; blank lines and lines starting
                          with '#' are ignored)
    root/labels.csv       header ``image,labels`` (other columns ignored); ``labels`` holds class names
                          separated by spaces or ';', e.g. ``cat;dog`` or ``cat dog``
    root/images/...       the files named in the ``image`` column (sub-folders allowed)
    root/masks/<id>.png   optional GT masks (palette or grayscale class indices, 255 = ignore; without
                          background, value 0 is the first class of classes.txt)

Image ids are file-name stems. Splits ``train``/``val`` come from a hash of the id, so an image
keeps its split when others are added or removed; ``val_fraction`` of ids go to ``val``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.datasets.base import Dataset, Record, check_id
from pipeline.datasets.imageio import DatasetError, read_utf8_text
from pipeline.labels import first_class
from pipeline.registry import DATASETS

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp")
_LABEL_SEP = re.compile(r"[;\s]+")


@dataclass
class _Row:
    line: int
    image: str
    labels: list[str]


def read_class_list(path: str | Path, background: bool = True) -> list[str]:
    """Class names: with ``background``, "background" at index 0; without, the file's classes as
    listed (a "background" line is refused). Raises DatasetError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: class list file is missing (param data.folder_classes)")
    names: list[str] = []
    lines: dict[str, int] = {}
    for n, raw in enumerate(read_utf8_text(path).splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if _LABEL_SEP.search(name):
            raise DatasetError(f"{path}:{n}: class name {name!r} contains a space or ';', which separate labels in the CSV")
        if name in lines:
            raise DatasetError(f"{path}:{n}: duplicate class name {name!r} (first on line {lines[name]})")
        if name == "background" and not background:
            raise DatasetError(f"{path}:{n}: 'background' listed, but data.background is false (every pixel is one of "
                               f"the listed classes); remove the line or set data.background: true")
        if name == "background" and names:
            raise DatasetError(f"{path}:{n}: 'background' must be the first class or not listed at all")
        lines[name] = n
        names.append(name)
    if not names or names == ["background"]:
        raise DatasetError(f"{path}: class list has no foreground classes")
    if not background:
        return names
    return names if names[0] == "background" else ["background"] + names


def val_score(image_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per id (SHA-256, independent of Python's hash seed)."""
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


@DATASETS.register("folder")
class FolderDataset(Dataset):
    name = "folder"

    @classmethod
    def from_params(cls, data: dict, prepared_dir: Path) -> "FolderDataset":
        root = Path(data["root"])
        return cls(root, csv=root / data["folder_csv"], classes=root / data["folder_classes"],
                   images=root / data["folder_images"], val_fraction=data["folder_val_fraction"],
                   background=data.get("background", True))

    def __init__(self, root, csv: str | Path, classes: str | Path, images: str | Path, val_fraction: float = 0.2,
                 background: bool = True):
        super().__init__(root)
        self.background = bool(background)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise DatasetError(f"param data.folder_val_fraction: {val_fraction!r} must be in [0, 1)")
        self.csv_path = Path(csv)
        self.images_dir = Path(images)
        self.mask_dir = self.root / "masks"
        self._classes = read_class_list(classes, self.background)
        self._rows: dict[str, _Row] = {}
        self._lines: dict[str, list[int]] = {}
        order = self._read_csv()
        self._splits = self._split(order, float(val_fraction))

    def _read_csv(self) -> list[str]:
        path = self.csv_path
        if not path.is_file():
            raise DatasetError(f"{path}: labels CSV is missing (param data.folder_csv)")
        order: list[str] = []
        with io.StringIO(read_utf8_text(path), newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            cols = [c.strip().lower() for c in header or []]
            if "image" not in cols or "labels" not in cols:
                raise DatasetError(f"{path}: header must name the columns 'image' and 'labels', found {header}")
            ci, cl = cols.index("image"), cols.index("labels")
            for row in reader:
                line = reader.line_num
                if not any(c.strip() for c in row):
                    continue
                image = row[ci].strip() if ci < len(row) else ""
                labels = row[cl] if cl < len(row) else ""
                if not image:
                    raise DatasetError(f"{path}:{line}: empty 'image' field")
                rel = PurePosixPath(image.replace("\\", "/"))
                if rel.is_absolute() or ".." in rel.parts:
                    raise DatasetError(f"{path}:{line}: image path {image!r} must be relative to the images folder, without '..'")
                image_id = check_id(rel.stem, f"{path}:{line}")
                self._rows.setdefault(image_id, _Row(line, rel.as_posix(), [t for t in _LABEL_SEP.split(labels) if t]))
                self._lines.setdefault(image_id, []).append(line)
                order.append(image_id)
        if not order:
            raise DatasetError(f"{path}: no image rows below the header")
        return order

    @staticmethod
    def _split(order: list[str], val_fraction: float) -> dict[str, list[str]]:
        scores = {i: val_score(i) for i in order}
        val = {i for i, s in scores.items() if s < val_fraction}
        if val_fraction > 0 and not val and len(scores) > 1:  # a tiny set still gets one val image
            val = {min(scores, key=scores.get)}
        return {"train": [i for i in order if i not in val], "val": [i for i in order if i in val]}

    # --- the adapter interface -----------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self._classes

    def split_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise DatasetError(f"{self.csv_path}: unknown split {split!r}; a folder dataset has splits ['train', 'val']")
        return list(self._splits[split])

    def _row(self, image_id: str) -> _Row:
        try:
            return self._rows[image_id]
        except KeyError:
            raise DatasetError(f"{self.csv_path}: no row for image id {image_id!r}") from None

    def image_path(self, image_id: str) -> Path:
        p = self.images_dir / self._row(image_id).image
        if not p.suffix and not p.is_file():  # the CSV may name images without extension
            for ext in IMAGE_EXTS:
                if p.with_name(p.name + ext).is_file():
                    return p.with_name(p.name + ext)
        return p

    def gt_path(self, image_id: str) -> Path | None:
        p = self.mask_dir / f"{image_id}.png"
        return p if p.is_file() else None

    def describe(self, image_id: str) -> str:
        lines = self._lines.get(image_id, [])
        where = f"{self.csv_path}:{lines[0]}" if len(lines) == 1 else f"{self.csv_path} lines {lines}"
        return f"{where} (image {self._row(image_id).image})"

    def raw_labels(self, image_id: str) -> list[str]:
        return list(self._row(image_id).labels)

    def labels(self, image_id: str) -> list[int]:
        index = {n: i for i, n in enumerate(self._classes)}
        first = first_class(self.background)
        out = set()
        for name in self.raw_labels(image_id):
            if name not in index:
                raise DatasetError(f"{self.describe(image_id)}: unknown class name {name!r}; known: {self._classes[first:]}")
            if index[name] < first:
                raise DatasetError(f"{self.describe(image_id)}: 'background' is not an image label; list foreground classes only")
            out.add(index[name])
        return sorted(out)

    def check_item(self, image_id: str) -> Record:
        try:
            return super().check_item(image_id)
        except DatasetError as e:
            if str(e).startswith(str(self.csv_path)):
                raise
            raise DatasetError(f"{self.describe(image_id)}: {e}") from e
