"""CAM evaluation: pseudo labels from CAMs with a background threshold, swept over a range.

A pixel's pseudo label is the labelled class with the highest CAM when that score is above the
background threshold, else background (0). Two trivial baselines put the numbers in context:
``all_background`` (every pixel 0) and ``top_label`` (every pixel the image's most confident label).

Without a background class (``data.background: false``) there is no threshold: a pixel's label is
the argmax of its image's labels' CAMs (:class:`LabelArgmax`), and the metrics say so.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.metrics import ConfusionMatrix, percent


def threshold_range(lo: float, hi: float, step: float) -> list[float]:
    """lo, lo+step, ..., up to hi inclusive (rounded to 6 decimals)."""
    if step <= 0:
        raise ValueError(f"param cam.eval_thr_step: must be positive, got {step}")
    if lo > hi:
        raise ValueError(f"param cam.eval_thr_min ({lo}) must not exceed cam.eval_thr_max ({hi})")
    n = int(np.floor((hi - lo) / step + 1e-9)) + 1
    return [round(lo + i * step, 6) for i in range(n)]


def label_argmax(cam_full: np.ndarray, labels: Sequence[int], first: int = 0) -> np.ndarray:
    """(K, H, W) CAMs of every label class (channel c - first = class c) -> (H, W) uint8: per pixel the
    image's label with the highest CAM (no background)."""
    classes = sorted(int(c) for c in labels)
    if not classes:
        raise ValueError("an image without labels has no label to take the argmax over")
    arg = cam_full[[c - first for c in classes]].argmax(0)
    return np.asarray(classes, np.uint8)[arg]


def pseudo_label(cam_full: np.ndarray, threshold: float | None, labels: Sequence[int] | None = None,
                 background: bool = True) -> np.ndarray:
    """(K, H, W) CAMs -> (H, W) uint8: argmax class (1..K) where its score > threshold, else 0.
    Without ``background``: :func:`label_argmax` over ``labels`` (the threshold is not used)."""
    if not background:
        return label_argmax(cam_full, labels or [], 0)
    if cam_full.shape[0] == 0:
        return np.zeros(cam_full.shape[1:], np.uint8)
    top = cam_full.max(0)
    return np.where(top > threshold, cam_full.argmax(0) + 1, 0).astype(np.uint8)


class ThresholdSweep:
    """Accumulates one confusion matrix per background threshold, plus the two baselines."""

    def __init__(self, thresholds: Sequence[float], num_classes: int):
        self.thresholds = list(thresholds)
        self.num_classes = num_classes
        self.matrices = [ConfusionMatrix(num_classes) for _ in self.thresholds]
        self.baselines = {"all_background": ConfusionMatrix(num_classes), "top_label": ConfusionMatrix(num_classes)}
        self.images = 0

    def update(self, cam_full: np.ndarray, gt: np.ndarray, top_label: int, labels: Sequence[int] = ()) -> None:
        """cam_full: (K, H, W) at image size; gt: (H, W) uint8 (255 ignored); top_label: class 1..K."""
        top = cam_full.max(0) if cam_full.shape[0] else np.zeros(gt.shape, np.float32)
        arg = (cam_full.argmax(0) + 1).astype(np.uint8) if cam_full.shape[0] else np.zeros(gt.shape, np.uint8)
        for t, cm in zip(self.thresholds, self.matrices):
            cm.update(np.where(top > t, arg, 0).astype(np.uint8), gt)
        self.baselines["all_background"].update(np.zeros_like(gt), gt)
        self.baselines["top_label"].update(np.full_like(gt, top_label), gt)
        self.images += 1

    @property
    def has_ground_truth(self) -> bool:
        """Whether any scored image had a GT-labelled pixel (else there is no best threshold)."""
        return self.baselines["all_background"].has_ground_truth

    def curve(self) -> list[dict]:
        """[{"threshold", "miou"}] (empty without ground truth: nothing was measured)."""
        if not self.has_ground_truth:
            return []
        return [{"threshold": t, "miou": percent(cm.miou())} for t, cm in zip(self.thresholds, self.matrices)]

    def best(self) -> tuple[float | None, ConfusionMatrix]:
        """(best threshold, its matrix); the threshold is None without ground truth."""
        scores = [cm.miou() for cm in self.matrices]
        i = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
        return (self.thresholds[i] if self.has_ground_truth else None), self.matrices[i]

    def summary(self, class_names: Sequence[str]) -> dict:
        """ConfusionMatrix.summary at the best threshold + best_threshold + curve + baselines.

        Without ground truth: ``ground_truth`` False, and every figure (best_threshold included) None."""
        thr, cm = self.best()
        out = cm.summary(class_names)
        out["best_threshold"] = thr
        out["images"] = self.images
        out["curve"] = self.curve()
        out["baselines"] = {name: {"miou": percent(b.miou()), "pixel_accuracy": percent(b.pixel_accuracy())}
                            for name, b in self.baselines.items()}
        return out


class LabelArgmax:
    """CAM scoring without a background class: one confusion matrix of :func:`label_argmax`, and the
    ``top_label`` baseline. Same interface as :class:`ThresholdSweep`; no threshold, no curve."""

    NOTE = "no background class: each pixel takes the argmax of its image's labels' CAMs (no threshold to sweep)"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = ConfusionMatrix(num_classes)
        self.baselines = {"top_label": ConfusionMatrix(num_classes)}
        self.images = 0

    def update(self, cam_full: np.ndarray, gt: np.ndarray, top_label: int, labels: Sequence[int] = ()) -> None:
        """cam_full: (C, H, W) at image size (channel k = class k); gt (H, W) uint8; labels: the image's classes."""
        self.matrix.update(label_argmax(cam_full, labels, 0), gt)
        self.baselines["top_label"].update(np.full_like(gt, top_label), gt)
        self.images += 1

    @property
    def has_ground_truth(self) -> bool:
        return self.matrix.has_ground_truth

    def summary(self, class_names: Sequence[str]) -> dict:
        out = self.matrix.summary(class_names)
        out.update({"best_threshold": None, "threshold": "none", "note": self.NOTE, "images": self.images,
                    "curve": [], "baselines": {name: {"miou": percent(b.miou()), "pixel_accuracy": percent(b.pixel_accuracy())}
                                               for name, b in self.baselines.items()}})
        return out


def top_label(labels: Sequence[int], logits: np.ndarray, first: int = 1) -> int:
    """The image's most confident label: the labelled class with the highest classifier logit
    (logit ``c - first`` is class ``c``)."""
    labels = list(labels)
    if not labels:
        return 0
    return int(max(labels, key=lambda c: float(logits[c - first])))
