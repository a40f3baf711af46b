"""Segmentation metrics from a confusion matrix accumulated image by image."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.labels import IGNORE_INDEX


def percent(value) -> float | None:
    """A fraction as a JSON-ready percentage (2 decimals), or None when it is NaN / infinite (not measured)."""
    value = float(value)
    return round(100 * value, 2) if np.isfinite(value) else None


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix; rows = ground truth, columns = prediction.

    Pixels whose ground truth is ``ignore_index`` are skipped. A prediction of ``ignore_index``
    (an unlabelled pseudo-label pixel) counts in ``unlabelled`` and not in the matrix, so
    coverage and the precision over labelled pixels can be reported separately.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unlabelled = 0
        self.valid = 0
        self.valid_per_class = np.zeros(num_classes, dtype=np.int64)  # GT pixels of each class
        self.unlabelled_per_class = np.zeros(num_classes, dtype=np.int64)  # ... that the prediction left at 255

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        keep = gt != self.ignore_index
        self.valid += int(keep.sum())
        unl = keep & (pred == self.ignore_index)
        self.unlabelled += int(unl.sum())
        if keep.any() and gt[keep].max() >= self.num_classes:
            raise ValueError(f"label value out of range 0..{self.num_classes - 1} (and {self.ignore_index} = ignore)")
        self.valid_per_class += np.bincount(gt[keep], minlength=self.num_classes)
        self.unlabelled_per_class += np.bincount(gt[unl], minlength=self.num_classes)
        keep &= ~unl
        gt, pred = gt[keep], pred[keep]
        if gt.size and pred.max() >= self.num_classes:
            raise ValueError(f"label value out of range 0..{self.num_classes - 1} (and {self.ignore_index} = ignore)")
        self.matrix += np.bincount(gt * self.num_classes + pred, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.matrix += other.matrix
        self.unlabelled += other.unlabelled
        self.valid += other.valid
        self.valid_per_class += other.valid_per_class
        self.unlabelled_per_class += other.unlabelled_per_class
        return self

    def per_class_iou(self) -> np.ndarray:
        m = self.matrix
        tp = np.diag(m).astype(float)
        denom = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def precision(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.matrix.sum(0) > 0, tp / self.matrix.sum(0), np.nan)

    def recall(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.matrix.sum(1) > 0, tp / self.matrix.sum(1), np.nan)

    def coverage(self) -> np.ndarray:
        """Per GT class: the share of its pixels that the prediction labels (not 255)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.valid_per_class > 0, 1 - self.unlabelled_per_class / self.valid_per_class, np.nan)

    def miou(self) -> float:
        """Mean IoU over classes that occur in GT or prediction (NaN classes are left out)."""
        iou = self.per_class_iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    @property
    def has_ground_truth(self) -> bool:
        """Whether any GT-labelled pixel (not 255) was scored: without one there is nothing to measure."""
        return self.valid > 0

    def summary(self, class_names: Sequence[str]) -> dict:
        """JSON-ready dict: ground_truth (whether any GT pixel was scored), miou, pixel_accuracy, coverage
        and per-class iou/precision/recall (in %). Figures that cannot be measured (no GT) are None."""
        def per_class(values):
            return {n: percent(v) for n, v in zip(class_names, values)}

        return {
            "ground_truth": self.has_ground_truth,
            "miou": percent(self.miou()),
            "pixel_accuracy": percent(self.pixel_accuracy()),
            "coverage": round(100 * (1 - self.unlabelled / self.valid), 2) if self.valid else None,
            "per_class_iou": per_class(self.per_class_iou()),
            "per_class_precision": per_class(self.precision()),
            "per_class_recall": per_class(self.recall()),
            "per_class_coverage": per_class(self.coverage()),
        }


def update_metrics_file(path: str | Path, key: str, value: dict) -> None:
    """Set ``key`` in a JSON metrics file (other keys are kept), writing atomically."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    write_json(path, data)


def json_safe(data):
    """``data`` with NaN / ±inf (Python or numpy floats, at any depth) as None, numpy scalars and arrays
    as plain Python values and tuples as lists: what strict JSON can hold (NaN is not a JSON token)."""
    if isinstance(data, dict):
        return {(k.item() if isinstance(k, np.generic) else k): json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, np.ndarray):
        return json_safe(data.tolist())
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float) and not np.isfinite(data):
        return None
    return data


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as strict JSON (NaN / inf written as null, see :func:`json_safe`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as a CSV with a header (``columns``, default the first row's keys), atomically:
    the history and curve files DVC plots."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)
    tmp.replace(path)
    return path
