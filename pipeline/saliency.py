"""Saliency as the background cue (joint saliency + WSSS, Zeng et al., ICCV 2019).

``crf.background_cue: saliency`` and ``rw.background_cue: saliency`` let a saliency map decide
the background instead of the CAM's (1 - max CAM)^alpha:

- seeds (:func:`seeds_with_saliency`): background where saliency < ``saliency.bg_threshold``
  (confident background, whatever the CAM says); a pixel the CAM rule calls background but whose
  saliency is >= ``saliency.fg_threshold`` becomes 255 (salient, so not confidently background);
- the walk (:func:`background_score`): the background channel is 1 - saliency.

Where the maps come from (``saliency.source``):

- ``spectral`` (built in, no download): the spectral residual of the image's log amplitude
  spectrum (Hou & Zhang, CVPR 2007), computed on a 64-px-wide grey copy, blurred, scaled to [0, 1];
- ``folder``: one 8- or 16-bit grey PNG per image id, ``<saliency.folder>/<id>.png`` (any
  salient-object detector's output; resized to the image when its size differs). A missing or
  unreadable map is an error naming the file, or with ``saliency.on_missing: skip`` that image
  keeps the CAM cue (with a warning naming the file).
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from pipeline.labels import IGNORE_INDEX

log = logging.getLogger("wsss")

SOURCES = ("spectral", "folder")
SPECTRAL_WIDTH = 64


class SaliencyError(ValueError):
    """A saliency map that is missing, unreadable or not a grey image (the message names the file)."""


def saliency_for(cue: str, saliency: dict | None, param: str) -> dict | None:
    """The saliency params a stage passes to its workers: ``saliency`` when its background cue
    (``param``, e.g. ``crf.background_cue``) is ``saliency``, else None."""
    if cue == "cam":
        return None
    if cue != "saliency":
        raise ValueError(f"param {param}: {cue!r} is not 'cam' or 'saliency'")
    if saliency is None:
        raise ValueError(f"param {param}: saliency needs the saliency params")
    return saliency


def uses_saliency(params: dict) -> bool:
    """Whether any stage takes its background cue from saliency."""
    return params["crf"]["background_cue"] == "saliency" or params["rw"]["background_cue"] == "saliency"


def spectral_residual(image: np.ndarray, width: int = SPECTRAL_WIDTH) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32 saliency in [0, 1] (spectral residual)."""
    h, w = image.shape[:2]
    small_h = max(8, int(round(h * width / max(w, 1))))
    grey = cv2.resize(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), (width, small_h),
                      interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    spectrum = np.fft.fft2(grey)
    log_amp = np.log(np.abs(spectrum) + 1e-8).astype(np.float32)
    residual = log_amp - cv2.blur(log_amp, (3, 3), borderType=cv2.BORDER_REPLICATE)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), sigmaX=2.5)
    sal = cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(sal.min()), float(sal.max())
    return ((sal - lo) / (hi - lo) if hi > lo else np.zeros_like(sal)).astype(np.float32)


def read_saliency_png(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A grey PNG -> (H, W) float32 in [0, 1] at ``size`` (bilinear when it differs)."""
    path = Path(path)
    if not path.is_file():
        raise SaliencyError(f"saliency map not found: {path} (param saliency.folder; or saliency.on_missing: skip)")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise SaliencyError(f"saliency map {path} cannot be read as an image")
    if raw.ndim == 3:
        if raw.shape[2] not in (1, 3, 4) or (raw.shape[2] >= 3 and not (
                np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2]))):
            raise SaliencyError(f"saliency map {path} is not a grey image (shape {raw.shape})")
        raw = raw[..., 0]
    scale = 65535.0 if raw.dtype == np.uint16 else 255.0
    if raw.dtype not in (np.uint8, np.uint16):
        raise SaliencyError(f"saliency map {path}: pixel type {raw.dtype} is not 8- or 16-bit")
    sal = raw.astype(np.float32) / scale
    h, w = int(size[0]), int(size[1])
    if sal.shape != (h, w):
        sal = cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(sal, 0.0, 1.0)


def saliency_map(image_id: str, image: np.ndarray, sal: dict) -> np.ndarray | None:
    """The saliency of one image from the ``saliency`` params; None when its map is missing or bad
    and ``saliency.on_missing`` is ``skip``."""
    if sal["source"] == "spectral":
        return spectral_residual(image)
    if sal["source"] != "folder":
        raise ValueError(f"param saliency.source: {sal['source']!r} is not one of {list(SOURCES)}")
    try:
        return read_saliency_png(Path(sal["folder"]) / f"{image_id}.png", image.shape[:2])
    except SaliencyError as e:
        if sal["on_missing"] == "skip":
            log.warning("%s: image %s keeps the CAM background cue", e, image_id)
            return None
        raise


def seeds_with_saliency(seeds: np.ndarray, saliency: np.ndarray, sal: dict) -> np.ndarray:
    """(H, W) uint8 seeds from a CAM rule -> background where saliency < ``bg_threshold``; 255 where
    the CAM rule said background but saliency >= ``fg_threshold``."""
    out = np.where((seeds == 0) & (saliency >= sal["fg_threshold"]), IGNORE_INDEX, seeds)
    return np.where(saliency < sal["bg_threshold"], 0, out).astype(np.uint8)


def background_score(saliency: np.ndarray) -> np.ndarray:
    """The walk's background channel from saliency: 1 - saliency (float32)."""
    return (1.0 - saliency).astype(np.float32)


def saliency_digest(sal: dict, cache_file: str | Path | None = None) -> dict:
    """What the saliency cue reads: for ``folder`` the content digest of the folder's files (so an
    edited map re-runs crf and random_walk), else the source's name."""
    from pipeline.provenance import files_digest

    if sal["source"] != "folder" or not sal["folder"]:
        return {"source": sal["source"], "digest": sal["source"]}
    folder = Path(sal["folder"])
    if not folder.is_dir():
        raise FileNotFoundError(f"param saliency.folder: folder {folder} does not exist")
    return {"source": "folder", "folder": str(folder), **files_digest(folder, cache_file)}
