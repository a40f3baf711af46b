"""Dense CRF (Krähenbühl & Koltun) through ``pydensecrf2`` over a few labels.

Cost grows with the number of labels, so callers pass only the classes an image has plus
background. ``scale`` < 1 runs the CRF on a resized image (spatial kernel widths scaled with it)
and resizes the marginals back: about 2x faster at 0.5 for a small loss of boundary detail.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.config import SCHEMA

PROB_CLIP = 1e-5
_DEFAULT = {k: p.default for k, p in SCHEMA["crf"].items()}  # the params schema is the one source of defaults


@dataclass(frozen=True)
class CrfSettings:
    """The dense CRF's kernels and iterations (the ``crf`` params; defaults from the schema)."""

    iterations: int = _DEFAULT["iterations"]
    gaussian_sxy: float = _DEFAULT["gaussian_sxy"]
    gaussian_compat: float = _DEFAULT["gaussian_compat"]
    bilateral_sxy: float = _DEFAULT["bilateral_sxy"]
    bilateral_srgb: float = _DEFAULT["bilateral_srgb"]
    bilateral_compat: float = _DEFAULT["bilateral_compat"]
    scale: float = _DEFAULT["scale"]

    @classmethod
    def from_params(cls, crf: dict) -> "CrfSettings":
        """From the ``crf`` params namespace."""
        return cls(iterations=int(crf["iterations"]), gaussian_sxy=float(crf["gaussian_sxy"]),
                   gaussian_compat=float(crf["gaussian_compat"]), bilateral_sxy=float(crf["bilateral_sxy"]),
                   bilateral_srgb=float(crf["bilateral_srgb"]), bilateral_compat=float(crf["bilateral_compat"]),
                   scale=float(crf.get("scale", 1.0)))


def _check(image: np.ndarray, maps: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if maps.shape[-2:] != image.shape[:2]:
        raise ValueError(f"CRF maps {maps.shape} do not match the image {image.shape[:2]}")


def _inference(image: np.ndarray, unary: np.ndarray, n_labels: int, s: CrfSettings) -> np.ndarray:
    """unary (L, H*W) float32 energies -> marginals (L, H, W) float32."""
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    f = s.scale
    d.addPairwiseGaussian(sxy=s.gaussian_sxy * f, compat=s.gaussian_compat)
    d.addPairwiseBilateral(sxy=s.bilateral_sxy * f, srgb=s.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                           compat=s.bilateral_compat)
    return np.asarray(d.inference(s.iterations), dtype=np.float32).reshape(n_labels, h, w)


def _resized(image: np.ndarray, maps: np.ndarray, scale: float, interp) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    out = np.stack([cv2.resize(m, size, interpolation=interp) for m in maps])
    return im, out


def _back(q: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in q])


def crf_marginals(image: np.ndarray, probs: np.ndarray, settings: CrfSettings) -> np.ndarray:
    """image (H, W, 3) uint8, probs (L, H, W) scores in [0, 1] (need not sum to 1; unary = -log p)
    -> CRF marginals (L, H, W) float32."""
    _check(image, probs)
    n = probs.shape[0]
    if n == 1:
        return np.ones_like(probs, dtype=np.float32)
    h, w = image.shape[:2]
    probs = probs.astype(np.float32, copy=False)
    if settings.scale != 1.0:
        image, probs = _resized(image, probs, settings.scale, cv2.INTER_LINEAR)
    unary = -np.log(np.clip(probs, PROB_CLIP, 1.0)).reshape(n, -1)
    q = _inference(image, unary, n, settings)
    return q if settings.scale == 1.0 else _back(q, h, w)


def crf_argmax(image: np.ndarray, probs: np.ndarray, settings: CrfSettings) -> np.ndarray:
    """Index (into the first axis of ``probs``) of the CRF's most likely label: (H, W) int64."""
    return crf_marginals(image, probs, settings).argmax(0)


def label_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float, settings: CrfSettings) -> np.ndarray:
    """A hard label map (H, W) with values 0..n_labels-1, trusted with probability ``gt_prob``,
    refined by the CRF -> (H, W) int64 label indices."""
    _check(image, labels[None])
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"param crf.gt_prob: must be in (0, 1), got {gt_prob}")
    if n_labels == 1:
        return np.zeros(labels.shape, np.int64)
    h, w = image.shape[:2]
    onehot = np.full((n_labels,) + labels.shape, (1.0 - gt_prob) / (n_labels - 1), np.float32)
    np.put_along_axis(onehot, labels[None].astype(np.int64), gt_prob, axis=0)
    if settings.scale != 1.0:
        image, onehot = _resized(image, onehot, settings.scale, cv2.INTER_LINEAR)
    q = _inference(image, -np.log(onehot.reshape(n_labels, -1)), n_labels, settings)
    if settings.scale != 1.0:
        q = _back(q, h, w)
    return q.argmax(0)
